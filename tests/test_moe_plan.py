"""The planner counts what trains: for every MoE family (and dense ones), the count it derives
from config.json alone equals what the real scan's layer file trains through freeze_except, on
the report and on the model object; real-size MoE plans count their experts."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from families import FAMILIES, MOE, _configs, make_family

import spectrum_sm
from spectrum_sm.core.freeze import freeze_except
from spectrum_sm.core.names import model_class_for
from spectrum_sm.plan import plan
from spectrum_sm.training.memory import (
    adamw_state_bytes,
    build_meta,
    count_parameters,
    load_config,
    method_counts,
)

ROOT = Path(__file__).resolve().parents[1]
#: Dense families beside the MoE ones: biases trained with their weight (gpt-neox), a tied head.
DENSE = ("qwen3-dense", "qwen3-tied", "gpt-neox")
#: Ten layers, so 10% keeps one module of each type (the families' four would keep none).
LAYERS = 10


def build(name: str, path) -> None:
    """Family ``name`` with :data:`LAYERS` layers, saved as the families' checkpoints are."""
    base = _configs()[name]()
    data = base.to_dict()
    data["num_hidden_layers"] = LAYERS
    data.pop("layer_types", None)  # derived from the layer count (gpt-oss)
    config = type(base)(**{k: v for k, v in data.items() if k != "model_type"})
    torch.manual_seed(0)
    model = model_class_for(config).from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.uniform_(0.5, 1.5)  # fresh norms all 1.0 would tie every score
            else:
                param.normal_(0.0, 0.05)
    model.save_pretrained(path)


@pytest.fixture(scope="module", params=sorted(MOE) + list(DENSE))
def scanned(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "model"
    build(request.param, path)
    result = spectrum_sm.scan(path, 50, output_dir=path.parent / "scan", show_progress=False)
    return request.param, path, result


def region_size(shape, regions) -> int:
    """Elements in the union of ``regions`` (index tuples over the leading dimensions)."""
    depth = max(len(r) for r in regions)
    mask = torch.zeros(shape[:depth], dtype=torch.bool)
    for region in regions:
        mask[region] = True
    return int(mask.sum()) * math.prod(shape[depth:])


def trainable_on_model(model, report) -> int:
    """Trainable elements on the model object: every ``requires_grad`` parameter, a parameter
    trained in parts (``report.partial``) by its regions only."""
    return sum(
        region_size(p.shape, report.partial[n]) if n in report.partial else p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad
    )


@pytest.mark.integration
@pytest.mark.parametrize("percent", [10, 30, 50])
def test_planner_counts_what_the_layer_file_trains(scanned, percent, tmp_path):
    name, path, result = scanned
    layers = tmp_path / "layers.yaml"
    layers.write_text(result.layer_file_text(percent))
    meta, _ = build_meta(load_config(str(path)))
    counts = count_parameters(meta, percent)
    config = json.loads((path / "config.json").read_text())
    model = model_class_for(config).from_pretrained(path)
    report = freeze_except(model, layers)
    assert counts.trainable_params == report.trainable_params, name
    assert counts.trainable_params == trainable_on_model(model, report), name
    assert counts.total_params == report.all_params
    # Each trainable parameter is one tensor (a fused one's selected elements: one slice).
    selected = adamw_state_bytes(report.trainable_params, len(report.trainable))
    planned = adamw_state_bytes(*method_counts(counts, "spectrum"))
    if name in MOE:
        assert report.partial  # experts train by slice
        assert 0 < counts.expert_trainable_params < counts.expert_params
        # Which layers hold slices depends on the scores: the planner's tensor count (one
        # step scalar each) is a bound, and its optimizer bytes one the real selection meets.
        assert counts.trainable_tensors >= len(report.trainable)
        assert selected <= planned
    else:
        assert not report.partial and counts.expert_params == 0
        assert counts.trainable_tensors == len(report.trainable)
        assert selected == planned


def test_qwen3_30b_a3b_plan_counts_its_experts():
    """Issue 22: 890M trainable (the experts left out) and a 4-GPU recommendation."""
    result = plan("Qwen/Qwen3-30B-A3B", 30)
    assert result["total_params"] == 30_532_122_624
    # 30% of each (expert, projection) type: 14 of 48 layers, 128 experts, 3 projections.
    assert result["expert_trainable_params"] == 14 * 128 * 3 * 768 * 2048
    assert 9e9 <= result["trainable_params"] <= 10e9
    p5 = next(i for i in result["instances"] if i["instance_type"] == "ml.p5.48xlarge")
    spectrum = p5["methods"]["spectrum"]["per_gpu_gib"]
    full = p5["methods"]["full"]["per_gpu_gib"]
    assert spectrum < 0.55 * full, (spectrum, full)
    assert result["memory_one_gpu_gib"]["spectrum"] < 0.5 * result["memory_one_gpu_gib"]["full"]


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(set(FAMILIES) - MOE - set(DENSE)), ids=lambda n: n)
def test_planner_counts_what_trains_in_the_other_families(name, tmp_path):
    """The families' own four-layer checkpoints: multimodal ones (only the language model is
    scanned), a zero norm; 100% also selects the modules of one (the final norm)."""
    paths = make_family(name, tmp_path)
    result = spectrum_sm.scan(paths["model"], 50, output_dir=tmp_path / "scan", show_progress=False)
    meta, _ = build_meta(load_config(str(paths["model"])))
    config = json.loads((paths["model"] / "config.json").read_text())
    for percent in (25, 50, 100):
        layers = tmp_path / f"layers-{percent}.yaml"
        layers.write_text(result.layer_file_text(percent))
        model = model_class_for(config).from_pretrained(paths["model"])
        report = freeze_except(model, layers)
        counts = count_parameters(meta, percent)
        assert counts.trainable_params == report.trainable_params, percent
        assert counts.trainable_params == trainable_on_model(model, report), percent
        assert counts.trainable_tensors == len(report.trainable), percent


MOE_EXAMPLES = {
    "qwen3-30b-a3b.yaml": "Qwen/Qwen3-30B-A3B",
    "gpt-oss-20b.yaml": "openai/gpt-oss-20b",
}


@pytest.mark.integration
@pytest.mark.parametrize("example", sorted(MOE_EXAMPLES))
def test_moe_example_dry_run_trains_where_the_planner_says_it_fits(example):
    """Offline (the configs ship with the planner): the header command plans fsdp on the
    example's instance, the planner's per-GPU number is under 90% of its GPUs, and `plan`
    recommends that instance for the example's sequence and batch."""
    import yaml
    from factories import run_cli

    from spectrum_sm.core.instances import INSTANCES

    path = ROOT / "examples" / example
    assert path.read_text().startswith(f"# spectrum-sm run examples/{example} --dry-run")
    proc = run_cli("run", str(path), "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    training = json.loads(proc.stdout)["training"]
    assert training["HyperParameters"]["distribution"] == "fsdp"
    config = yaml.safe_load(path.read_text())["training"]
    assert training["ResourceConfig"]["InstanceType"] == config["instance_type"]
    row = INSTANCES[config["instance_type"]]
    match = re.search(r"fsdp over (\d+) GPUs ([0-9.]+) GiB", proc.stderr)
    assert match and int(match.group(1)) == row.gpus, proc.stderr
    assert float(match.group(2)) <= 0.9 * row.gpu_gib
    hps = config["hyperparameters"]
    result = plan(
        MOE_EXAMPLES[example],
        config.get("top_percent", 30),
        seq=hps["max_seq_length"],
        batch=hps["per_device_train_batch_size"],
    )
    assert result["recommended"]["spectrum"] == config["instance_type"]
    planned = next(i for i in result["instances"] if i["instance_type"] == row.name)
    assert planned["methods"]["spectrum"]["per_gpu_gib"] == pytest.approx(
        float(match.group(2)), abs=0.06
    )


@pytest.mark.parametrize("model", sorted(MOE_EXAMPLES.values()))
def test_plan_cli_on_moe_models_counts_experts(model):
    from factories import run_cli

    proc = run_cli("plan", model, "--top-percent", "30", "--json", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["expert_trainable_params"] > 0.8 * (
        result["trainable_params"] - result["embedding_params"]
    )
    assert result["recommended"]["spectrum"] is not None


def test_plan_cli_text_shows_the_expert_slices_of_spectrums_count():
    from factories import run_cli

    proc = run_cli("plan", "Qwen/Qwen3-30B-A3B", "--top-percent", "30", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "spectrum, expert slices" in x)
    assert "8,455,716,864" in line
    dense = run_cli("plan", "Qwen/Qwen3-8B", "--top-percent", "30", env={"HF_HUB_OFFLINE": "1"})
    assert dense.returncode == 0 and "expert slices" not in dense.stdout
