"""The Studio notebook: committed without outputs, and executed end to end in local mode against
moto with a tiny model (parameters injected after the cell tagged "parameters", as papermill
does)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "spectrum_qwen3_8b.ipynb"


def test_outputs_are_cleared_and_parameters_tagged():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


@pytest.mark.integration
def test_notebook_runs_in_local_mode(moto_server, tmp_path):
    from nbclient import NotebookClient

    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=24)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    parameters = {
        "LOCAL": True,
        "MODEL_ID": str(paths["model"]),
        "TOP_PERCENT": 50,
        "SPOT": False,
        "TRAIN_ROWS": rows,
        "WORKDIR": str(tmp_path / "work"),
        # Section 7: QLoRA cannot run without CUDA (skipped), LoRA and Spectrum can.
        "COMPARE_METHODS": "spectrum:50,lora,qlora",
        "COMPARE_SETTINGS": ["lora.learning_rate=2e-3", "qlora.learning_rate=2e-3"],
        "COMPARE_MAX_STEPS": 4,
        "HYPERPARAMETERS": {
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "max_seq_length": 64,
            "precision": "fp32",
            "learning_rate": 1e-3,
        },
    }
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    index = next(
        i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])
    )
    injected = nbformat.v4.new_code_cell(
        "\n".join(f"{k} = {v!r}" for k, v in parameters.items()),
        metadata={"tags": ["injected-parameters"]},
    )
    notebook.cells.insert(index + 1, injected)
    NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    report = json.loads((tmp_path / "work" / "model" / "training_report.json").read_text())
    assert report["steps"] == 4 and report["method"] == "spectrum"
    assert report["final_eval_loss"] is not None  # the held-out rows
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the SNR heatmap and the comparison figure, inline
    summary = json.loads((tmp_path / "work" / "comparison" / "comparison.json").read_text())
    status = {(r["method"], r["top_percent"]): r["status"] for r in summary["runs"]}
    assert status == {("spectrum", 50): "completed", ("lora", None): "completed",
                      ("qlora", None): "skipped"}  # fmt: skip
    assert summary["analysis"]["reused"]  # the notebook's own analysis, not a second scan
    rates = {r["method"]: r["learning_rate"] for r in summary["runs"]}
    assert rates["lora"] == 2e-3 and rates["spectrum"] == 1e-3
