"""Certified mixed precision: float32 bounds that hold, and selections equal to float64's."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import spectrum_sm
from spectrum_sm.core.snr import (
    GramAccumulator,
    float32_eigenvalue_bound,
    snr_bounds,
    snr_from_singular_values,
)


def spectra(kind: str, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Weights whose spectra stress a float32 Gram: graded, column-scaled, heavy-tailed..."""
    long, short = max(rows, cols), min(rows, cols)
    a = torch.randn(long, short, generator=gen)
    if kind == "graded":
        q, _ = torch.linalg.qr(a)
        v, _ = torch.linalg.qr(torch.randn(short, short, generator=gen))
        a = (q * torch.logspace(0, -4, short)) @ v.T
    elif kind == "colscale":
        a = a * torch.logspace(0, -3, short)
    elif kind == "heavy":
        a = torch.distributions.StudentT(2.0).sample((long, short))
    elif kind == "lowrank":
        a = torch.randn(long, 6, generator=gen) @ torch.randn(6, short, generator=gen) + 1e-3 * a
    elif kind == "outliers":
        spikes = torch.randn(long, 3, generator=gen) @ torch.randn(3, short, generator=gen)
        a = a + 20 * spikes / math.sqrt(short)
    elif kind == "offset":
        a = a + 4.0
    elif kind == "zero-columns":
        a[:, : short // 3] = 0
    return a if rows >= cols else a.T


def both_ways(weight: torch.Tensor, chunk: int = 97, float64_eigen: bool = False):
    """(eigenvalues, float64 eigenvalues, error bound, bounds, the float64 method's score)."""
    n, m = weight.shape
    tall = weight if n >= m else weight.T
    acc32 = GramAccumulator(tall.shape[1], dtype=torch.float32)
    acc64 = GramAccumulator(tall.shape[1])
    for start in range(0, tall.shape[0], chunk):
        acc32.add(tall[start : start + chunk].float())
        acc64.add(tall[start : start + chunk])
    exact64 = torch.flip(torch.linalg.eigvalsh(acc64.gram, UPLO="L"), (0,))
    if float64_eigen:
        eig, shifted_norm = acc32.eigenvalues(), None
    else:
        eig, shifted_norm = acc32.shifted_eigenvalues()
    error = float32_eigenvalue_bound(float(eig[0]), shifted_norm, min(n, m), max(n, m))
    score64 = snr_from_singular_values(exact64.clamp_min(0).sqrt(), n, m)
    return eig, exact64, error, snr_bounds(eig, error, n, m), score64


KINDS = ["gauss", "graded", "colscale", "heavy", "lowrank", "outliers", "offset", "zero-columns"]


@pytest.mark.parametrize("solver", ["float32", "float64-eigen", "bf16-units"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("long", "short"), [(160, 160), (600, 200), (200, 520), (1500, 320)])
def test_bounds_hold_with_margin_on_stressed_spectra(kind, long, short, solver):
    from spectrum_sm.core.scanner import _bf16_exact_matmul

    gen = torch.Generator().manual_seed(long + short)
    weight = spectra(kind, long, short, gen).to(torch.bfloat16)
    with _bf16_exact_matmul(solver == "bf16-units"):  # AMX / tensor-core products of bf16
        eig, exact64, error, (low, high), score64 = both_ways(
            weight, float64_eigen=solver == "float64-eigen"
        )
    # The model's error bound covers every eigenvalue at least twice over...
    assert float((eig - exact64).abs().max()) <= error / 2
    # ...so the float64 method's score lies inside the interval.
    assert low <= score64 <= high
    point = snr_from_singular_values(eig.clamp_min(0).sqrt(), *weight.shape)
    assert low <= point <= high


@pytest.mark.parametrize("seed", range(6))
def test_interval_contains_every_perturbation_within_the_error(seed):
    """snr_bounds is sound for any eigenvalues within +-error, extremes included."""
    gen = torch.Generator().manual_seed(seed)
    n, m = 40, 90
    weight = torch.randn(m, n, generator=gen) + (seed % 3) * torch.randn(m, 1, generator=gen)
    lam = torch.flip(torch.linalg.eigvalsh((weight.T @ weight).double()), (0,))
    error = float(lam[0]) * 10 ** (-2 - seed % 3)
    low, high = snr_bounds(lam, error, n, m)
    for trial in range(200):
        if trial < 2:
            delta = torch.full_like(lam, error * (1 if trial else -1))
        else:
            delta = (torch.rand(lam.shape, generator=gen, dtype=torch.float64) * 2 - 1) * error
        moved = (lam + delta).clamp_min(0)
        score = snr_from_singular_values(moved.sqrt(), n, m)
        assert low <= score <= high
    exact = snr_from_singular_values(lam.clamp_min(0).sqrt(), n, m)
    assert snr_bounds(lam, 0.0, n, m) == (pytest.approx(exact), pytest.approx(exact))


def near_tie_checkpoint(path, order: str):
    """One type of four 192x192 weights with well separated scores c1 > c2 > c3 > c4, two of
    them near-identical copies (one bf16 ulp apart in one element): the copies of c1 at the top
    (``"top"``), or copies of c2 across the 50% boundary (``"boundary"``)."""
    gen = torch.Generator().manual_seed(3)
    size = 192
    candidates = []
    for rank in (0, 10, 20, 30):
        noise = torch.randn(size, size, generator=gen) / size**0.5
        signal = torch.randn(size, rank, generator=gen) @ torch.randn(rank, size, generator=gen)
        candidates.append((noise + 4.0 * signal / size).to(torch.bfloat16))

    def score(w):
        return snr_from_singular_values(torch.linalg.svdvals(w.double()), size, size)

    c1, c2, c3, c4 = sorted(candidates, key=score, reverse=True)
    twin = c1 if order == "top" else c2
    nudged = twin.clone()
    nudged[5, 7] = torch.nextafter(nudged[5, 7].float(), torch.tensor(9.0)).to(torch.bfloat16)
    layers = [twin, nudged, c3, c4] if order == "top" else [c1, twin, nudged, c4]
    tensors = {
        f"model.layers.{i}.mlp.down_proj.weight": w.contiguous() for i, w in enumerate(layers)
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "planted"}))
    return path


def test_near_tie_across_the_boundary_is_recomputed_in_float64(tmp_path):
    model = near_tie_checkpoint(tmp_path / "m", "boundary")
    certified = spectrum_sm.scan(model, 50, output_dir=tmp_path / "out", show_progress=False)
    float64 = spectrum_sm.scan(model, 50, precision="float64", show_progress=False)
    assert certified.selection() == float64.selection()
    twins = {"model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"}
    assert set(certified.recomputed) == twins
    manifest = json.loads(certified.files["manifest"].read_text())
    assert manifest["recomputed_in_float64"] == certified.recomputed
    for module, record in manifest["tensors"].items():
        assert record["precision"] == ("float64" if module in twins else "float32")
        assert record["eigenvalue_error"] >= 0
        assert record["bounds"][0] <= float64.scores[module].snr <= record["bounds"][1]
        if module in twins:  # recomputed: exactly the float64 method's score
            assert record["snr"] == float64.scores[module].snr


def test_select_refuses_a_percent_its_bounds_leave_open(tmp_path):
    model = near_tie_checkpoint(tmp_path / "m", "top")
    result = spectrum_sm.scan(model, 50, output_dir=tmp_path / "out", show_progress=False)
    assert result.recomputed == []  # at 50% the twins are both in: nothing to decide
    assert spectrum_sm.select(result.files["results"], 50, output_dir=tmp_path / "a")
    with pytest.raises(spectrum_sm.SpectrumError, match="at 25% the float32 scores of"):
        spectrum_sm.select(result.files["results"], 25, output_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())
    # Certified at both percents, both selections are float64's.
    both = spectrum_sm.scan(
        model, 50, certify_percents=[25], output_dir=tmp_path / "both", show_progress=False
    )
    float64 = spectrum_sm.scan(model, 50, precision="float64", show_progress=False)
    path = spectrum_sm.select(both.files["results"], 25, output_dir=tmp_path / "c")
    assert both.recomputed and both.certified_percents == [25, 50]
    assert path.read_text() == float64.layer_file_text(25)


def test_certified_scan_of_a_wider_model_matches_float64(tmp_path):
    from factories import tiny_qwen3

    model = tiny_qwen3(tmp_path / "m", layers=6, hidden=256, intermediate=512, vocab=512, seed=2)
    certified = spectrum_sm.scan(model, 30, certify_percents=[10, 50], show_progress=False)
    float64 = spectrum_sm.scan(model, 30, precision="float64", show_progress=False)
    assert {s.precision for s in certified.scores.values()} >= {"float32", "float64"}
    for percent in (10, 30, 50):
        assert certified.selection(percent) == float64.selection(percent)
    for module, score in certified.scores.items():
        assert score.bounds[0] <= float64.scores[module].snr <= score.bounds[1]
        assert score.snr == pytest.approx(float64.scores[module].snr, rel=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["gauss", "colscale"])
def test_bounds_hold_at_the_sizes_where_float32_errors_are_largest(kind):
    """n = 2048 is where the float32 eigensolver's error peaked in our measurements."""
    gen = torch.Generator().manual_seed(11)
    weight = spectra(kind, 3072, 2048, gen).to(torch.bfloat16)
    for float64_eigen in (False, True):
        eig, exact64, error, (low, high), score64 = both_ways(
            weight, chunk=1024, float64_eigen=float64_eigen
        )
        assert float((eig - exact64).abs().max()) <= error / 2
        assert low <= score64 <= high


def test_from_float64_eigen_from_on_the_float32_gram_is_solved_in_float64(tmp_path, monkeypatch):
    """Weights whose short side reaches FLOAT64_EIGEN_FROM (2048 on real models; 256 here, so
    the test stays small) are labelled float32-gram and carry the bound of a float64 solve:
    the product's rounding alone, without the float32 eigensolver's term."""
    from factories import tiny_qwen3
    from safetensors import safe_open

    from spectrum_sm.core import scanner

    model = tiny_qwen3(tmp_path / "m", layers=2, hidden=256, intermediate=512, vocab=512, seed=3)
    weights = {}
    for shard in model.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            weights.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (not a dict)
    monkeypatch.setattr(scanner, "FLOAT64_EIGEN_FROM", 256)
    certified = spectrum_sm.scan(model, 30, show_progress=False)
    float64 = spectrum_sm.scan(model, 30, precision="float64", show_progress=False)
    gram = [s for s in certified.scores.values() if s.precision == "float32-gram"]
    assert len(gram) >= 4 and all(min(s.shape) >= 256 for s in gram)
    for score in gram:
        exact = float64.scores[score.module].snr
        assert score.bounds[0] <= exact <= score.bounds[1]
        assert score.snr == pytest.approx(exact, rel=1e-5)
        weight = weights[score.stored].to(torch.float64)
        largest = float(torch.linalg.matrix_norm(weight, ord=2)) ** 2
        expected = float32_eigenvalue_bound(largest, None, min(score.shape), max(score.shape))
        assert score.error == pytest.approx(expected, rel=1e-3)
    assert certified.selection() == float64.selection()
