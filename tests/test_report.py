"""The SNR report: heatmap PNG, sorted table, trainable share; inline display in notebooks."""

from __future__ import annotations

import json

import pytest
from factories import run_cli

import spectrum_sm
from spectrum_sm.report import snr_report

pytestmark = pytest.mark.integration


def test_report_from_our_scan_has_counts_and_a_png(tiny_model, tmp_path):
    result = spectrum_sm.scan(tiny_model, 50, output_dir=tmp_path, show_progress=False)
    report = snr_report(result.files["results"], 50)
    assert report.png.startswith(b"\x89PNG") and report._repr_png_() == report.png
    assert report.selection == result.selection(50)
    from transformers import AutoModelForCausalLM

    from spectrum_sm.core.freeze import freeze_except

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    frozen = freeze_except(model, result.files["layers"])
    assert report.trainable_params == frozen.trainable_params
    assert report.all_params == frozen.all_params
    assert any("trainable%" in line for line in report.lines())


def test_report_of_a_36_layer_reference_file_via_cli(tmp_path):
    types = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "input_layernorm"]
    table = {
        f"model.layers.{i}.{t}": {"snr": (i * 7 + len(t)) % 13 / 13, "type": t}
        for t in types
        for i in range(36)
    }
    table["lm_head"] = {"snr": 0.5, "type": "lm_head"}
    src = tmp_path / "snr_results_Qwen-Qwen3-8B.json"
    src.write_text(json.dumps(table))
    proc = run_cli("report", str(src), "--top-percent", "30", "--output", str(tmp_path / "r.png"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")
    assert "10/36" in proc.stdout  # int(36 * 30 / 100) per type
    assert "parameter counts omitted" in proc.stdout


def test_report_rejects_bad_results(tmp_path):
    bad = tmp_path / "snr_results_x.json"
    bad.write_text("[]")
    proc = run_cli("report", str(bad))
    assert proc.returncode == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr
