"""Against the reference project itself (cognitivecomputations/spectrum), not our idea of it.

Opt in with ``SPECTRUM_REFERENCE_REPO=/path/to/a/checkout/of/spectrum``: its code and published
results are not ours to ship, so these tests skip without one.

* every published ``model_snr_results/*.json`` (both layouts): ``select`` picks what the
  reference's own rule picks at 10/25/30/50%, and reproduces its two published 50% layer files
  byte for byte;
* the reference's ``spectrum.py`` (its ``ModelModifier``, unmodified) scans our tiny families,
  and our layer files name the same modules.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
from families import MOE, make_family

import spectrum_sm
from spectrum_sm.core.selection import load_results, select_layers

REPO = Path(os.environ.get("SPECTRUM_REFERENCE_REPO", "/nonexistent"))
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (REPO / "spectrum.py").is_file(),
        reason="set SPECTRUM_REFERENCE_REPO to a checkout of cognitivecomputations/spectrum",
    ),
]
RESULTS = sorted((REPO / "model_snr_results").glob("*.json"))


def reference_rule(path: Path, percent: float) -> dict[str, list[str]]:
    """The reference's generate_unfrozen_params_yaml selection, on either layout (the sorted
    one is grouped already; its code only reads the other, hence this adapter)."""
    data = json.loads(path.read_text())
    first = next(iter(data.values()))
    if "snr" in first:
        grouped: dict[str, list] = {}
        for name, info in data.items():
            grouped.setdefault(info["type"], []).append((name, info["snr"]))
    else:
        grouped = {t: list(modules.items()) for t, modules in data.items()}
    out = {}
    for layer_type, layers in grouped.items():
        ranked = sorted(layers, key=lambda x: x[1], reverse=True)
        out[layer_type] = [n for n, _ in ranked[: int(len(layers) * percent / 100)]]
    return out


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_published_results_select_like_the_reference(path):
    table = load_results(path)
    for percent in (10, 25, 30, 50):
        assert select_layers(table, percent) == reference_rule(path, percent)


@pytest.mark.parametrize(
    "slug", ["akjindal53244-Llama-3.1-Storm-8B", "meta-llama-Meta-Llama-3.1-8B-Instruct"]
)
def test_published_layer_files_are_reproduced(slug, tmp_path):
    published = REPO / f"snr_results_{slug}_unfrozenparameters_50percent.yaml"
    ours = spectrum_sm.select(
        REPO / "model_snr_results" / f"snr_results_{slug}.json", 50, output_dir=tmp_path
    )
    assert ours.name == published.name
    assert ours.read_text() == published.read_text()


def _reference_module():
    if "prompt_toolkit" not in sys.modules:  # only its interactive dialogs use it
        stub = types.ModuleType("prompt_toolkit")
        stub.shortcuts = types.SimpleNamespace(checkboxlist_dialog=None, input_dialog=None)
        sys.modules["prompt_toolkit"] = stub
        sys.modules["prompt_toolkit.shortcuts"] = stub.shortcuts
    spec = importlib.util.spec_from_file_location("reference_spectrum_py", REPO / "spectrum.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "family", ["qwen3-dense", "qwen3-tied", "llama-zero-norm", "gpt-neox", "qwen3-moe", "mixtral"]
)
def test_the_reference_scanner_picks_the_modules_we_pick(family, tmp_path, monkeypatch):
    paths = make_family(family, tmp_path / "family")
    ours = spectrum_sm.scan(paths["model"], 50, show_progress=False)
    monkeypatch.chdir(tmp_path)
    reference = _reference_module().ModelModifier(model_name=str(paths["model"]), top_percent=50)
    reference.assess_layers_snr(reference.get_weight_types())
    scores = dict(reference.layer_snr)
    assert len(scores) >= 4 * 6  # every layer was scored
    if ours.tied_embeddings:
        scores.pop("lm_head", None)
    for module, info in scores.items():
        assert ours.scores[module].snr == pytest.approx(info["snr"], rel=1e-4, abs=1e-7), module
    results = tmp_path / "reference.json"
    results.write_text(json.dumps(scores))
    theirs = reference_rule(results, 50)
    mine = ours.selection(50)
    for layer_type, modules in theirs.items():
        assert sorted(mine[layer_type]) == sorted(modules), layer_type
    # What the reference cannot score: fused experts (no `weight` attribute), and nothing else.
    missing = {s.type for s in ours.scores.values()} - set(theirs)
    assert missing == (
        {s.type for s in ours.scores.values() if ".experts." in s.type} if family in MOE else set()
    )
