"""The SNR maths: the reference formula, the float64 Gram method's accuracy, planted rankings."""

from __future__ import annotations

import math

import pytest
import torch
from reference_spectrum import reference_snr

from spectrum_sm.core.snr import (
    GramAccumulator,
    module_type,
    natural_key,
    singular_values_exact,
    snr_from_singular_values,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.7.mlp.down_proj", "mlp.down_proj"),
        ("model.layers.12.self_attn.q_norm", "self_attn.q_norm"),
        ("model.language_model.layers.0.mlp.up_proj", "mlp.up_proj"),
        ("lm_head", "lm_head"),
        ("model.embed_tokens", "model.embed_tokens"),
        ("model.norm", "model.norm"),
    ],
)
def test_module_type(name, expected):
    assert module_type(name) == expected


def test_natural_key_orders_layers_numerically():
    names = ["model.layers.10.mlp", "model.layers.2.mlp", "model.layers.1.mlp"]
    assert sorted(names, key=natural_key) == [
        "model.layers.1.mlp",
        "model.layers.2.mlp",
        "model.layers.10.mlp",
    ]


def gram_singular_values(weight: torch.Tensor, chunk: int = 37) -> torch.Tensor:
    w = weight if weight.ndim == 2 else weight[None, :]
    tall = w if w.shape[0] >= w.shape[1] else w.T
    acc = GramAccumulator(tall.shape[1], block=8)
    for start in range(0, tall.shape[0], chunk):
        acc.add(tall[start : start + chunk])
    return acc.singular_values()


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (50, 50), (1, 80), (200, 7)])
def test_score_matches_reference_formula(shape):
    torch.manual_seed(1)
    w = (torch.randn(*shape) + 0.5 * torch.randn(shape[0], 1) @ torch.randn(1, shape[1])).to(
        torch.bfloat16
    )
    expected = reference_snr(w)
    n, m = shape
    assert snr_from_singular_values(singular_values_exact(w), n, m) == pytest.approx(
        expected, rel=1e-5
    )
    assert snr_from_singular_values(gram_singular_values(w), n, m) == pytest.approx(
        expected, rel=1e-5
    )


def test_one_dimensional_weight_scores_like_reference():
    w = torch.rand(48) + 0.5
    s = gram_singular_values(w)
    assert s.shape == (1,)
    assert float(s[0]) == pytest.approx(float(w.double().norm()), rel=1e-12)
    assert snr_from_singular_values(s, 1, 48) == pytest.approx(reference_snr(w), rel=1e-6)


def test_all_zero_weight_scores_infinity_like_the_reference():
    """Noise values summing to zero: the reference's ``float('inf')``, ranked first."""
    assert snr_from_singular_values(torch.zeros(5), 5, 8) == math.inf
    assert reference_snr(torch.zeros(5, 8)) == math.inf
    # Exactly zero noise values next to signal: +inf as well (the reference's float32 SVD
    # of a rank-one matrix leaves ~1e-6 there instead, hence a large finite score).
    assert snr_from_singular_values(torch.tensor([21.0, 0.0, 0.0, 0.0, 0.0]), 5, 8) == math.inf


def test_non_finite_weight_is_rejected():
    with pytest.raises(ValueError, match="non-finite"):
        snr_from_singular_values(torch.tensor([float("nan"), 1.0]), 2, 2)


def test_float64_gram_is_accurate_on_ill_conditioned_weights():
    """Singular values spanning 6 decades: float64 Gram keeps ~1e-9 relative accuracy where it
    matters, while a float32 Gram visibly moves the small ones."""
    torch.manual_seed(0)
    n, m = 300, 120
    u, _ = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))
    spectrum = torch.logspace(0, -6, m, dtype=torch.float64)
    w = (u * spectrum) @ v.T
    exact = torch.linalg.svdvals(w)
    ours = gram_singular_values(w)
    big = exact > 1e-4 * exact[0]
    rel = ((ours - exact).abs() / exact)[big]
    assert float(rel.max()) < 1e-8
    # The quartiles that set the threshold (~1e-1.5 and ~1e-4.5 here) survive in float64.
    assert snr_from_singular_values(ours, n, m) == pytest.approx(
        snr_from_singular_values(exact, n, m), rel=1e-9
    )
    g32 = (w.float().T @ w.float()).double()
    lossy = torch.flip(torch.linalg.eigvalsh(g32).clamp_min(0).sqrt(), (0,))
    assert float(((lossy - exact).abs() / exact)[big].max()) > 1e-3


def planted_weight(rank: int, gen: torch.Generator, size: int = 128) -> torch.Tensor:
    """Square noise (singular values in [0, 2]) plus ``rank`` orthogonal components of value 8."""
    noise = torch.randn(size, size, generator=gen) / math.sqrt(size)
    u, _ = torch.linalg.qr(torch.randn(size, rank, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(size, rank, generator=gen))
    return noise + 8.0 * u @ v.T


@pytest.mark.parametrize("seed", range(4))
def test_planted_rank_orders_scores(seed):
    """With the top singular value fixed, each planted component adds signal and the score rises:
    score ~ (noise_above + rank * 8) / (noise_below * 8)."""
    gen = torch.Generator().manual_seed(seed)
    scores = [
        snr_from_singular_values(gram_singular_values(planted_weight(r, gen)), 128, 128)
        for r in (1, 4, 8, 16, 24)
    ]
    assert scores == sorted(scores)
    assert scores[-1] > 2 * scores[0]
