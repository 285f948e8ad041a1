"""Spectrum's signal-to-noise score, computed exactly as the reference does, and fast.

The reference (cognitivecomputations/spectrum) takes the singular values ``S`` of a weight ``W``
(``W[None, :]`` when 1-D), estimates the noise level from their inter-quartile range, splits them
at the Marchenko-Pastur edge and scores ``(signal / noise) / S[0]``. A noise sum of zero (an
all-zero weight, for one) scores ``+inf``, like the reference's ``float('inf')``.

``S`` comes from the eigenvalues of the smaller Gram matrix, built chunk by chunk straight from the
stored dtype (:class:`GramAccumulator`; only the lower block triangle is computed, which is all
``eigvalsh`` reads), or from ``torch.linalg.svdvals`` in float32 like the reference
(:func:`singular_values_exact`).

The Gram matrix and its eigenvalues can be computed in float32, twice as fast as float64 on a CPU
and up to 64x on GPUs with weak float64. Every float32 eigenvalue then carries an absolute error
bound (:func:`float32_eigenvalue_bound`), and :func:`snr_bounds` turns those bounds into an
interval that contains the float64 score; the scanner recomputes in float64 only the weights whose
interval could move them across a selection boundary.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Inter-quartile range of a standard normal distribution.
IQR_TO_SIGMA = 1.349
#: Unit roundoff of float32.
UNIT_ROUNDOFF_32 = 2.0**-24


def module_type(module_name: str) -> str:
    """The reference's *type* of a module: its name after the first all-digit component.

    A module whose only index is its last component (``visual.merger.mlp.0``) would get an empty
    type there, which matches every module; it is its own type here, like a module with no index.

    >>> module_type("model.layers.7.mlp.down_proj")
    'mlp.down_proj'
    >>> module_type("lm_head")
    'lm_head'
    """
    parts = module_name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[index + 1 :]) or module_name
    return module_name


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10`` (the model's own layer order)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def as_matrix_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """The 2-D shape the reference uses: ``(1, m)`` for a 1-D weight."""
    if len(shape) not in (1, 2):
        raise ValueError(f"expected a 1-D or 2-D weight, got shape {tuple(shape)}")
    return (1, int(shape[0])) if len(shape) == 1 else (int(shape[0]), int(shape[1]))


def _threshold_factor(n: int, m: int) -> float:
    beta = min(n, m) / max(n, m)
    return (1.0 + math.sqrt(beta)) / IQR_TO_SIGMA


def snr_from_singular_values(singular_values: torch.Tensor, n: int, m: int) -> float:
    """Spectrum's score from the singular values of an ``n x m`` matrix (any order)."""
    import torch

    s = torch.sort(singular_values.detach().to(torch.float64).flatten(), descending=True).values
    s_max = float(s[0])
    if not math.isfinite(s_max):
        raise ValueError("the weight holds non-finite values (inf or NaN)")
    threshold = float(torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) * _threshold_factor(n, m)
    above = s > threshold
    signal = float(s[above].sum()) if bool(above.any()) else 0.0
    # The reference: noise 1.0 when every value is signal, +inf when the noise values sum to 0.
    noise = float(s[~above].sum()) if bool((~above).any()) else 1.0
    return signal / noise / s_max if noise != 0.0 and s_max > 0 else math.inf


def snr_bounds(eigenvalues: torch.Tensor, error: float, n: int, m: int) -> tuple[float, float]:
    """An interval that holds the score of every matrix whose Gram eigenvalues lie within
    ``error`` of ``eigenvalues`` (each, in sorted order: Weyl's inequality gives that matching).

    Singular values ``S_i`` then lie in ``[sqrt(l_i - e), sqrt(l_i + e)]``; quartiles are monotone
    in every ``S_i``, which bounds the threshold; a value is surely signal above the largest
    possible threshold and surely noise below the smallest. The score falls as values move from
    signal to noise, so the extremes put every undecided value on one side; the reference's two
    special cases (no noise value: noise 1.0; noise values summing to 0: +inf) are taken as
    separate cases when they are possible.
    """
    import torch

    lam = torch.sort(eigenvalues.detach().to(torch.float64).flatten(), descending=True).values
    lam = lam.clamp_min(0.0)
    lo = (lam - error).clamp_min(0.0).sqrt()
    hi = (lam + error).sqrt()
    factor = _threshold_factor(n, m)
    t_lo = max(0.0, float(torch.quantile(lo, 0.75) - torch.quantile(hi, 0.25))) * factor
    t_hi = float(torch.quantile(hi, 0.75) - torch.quantile(lo, 0.25)) * factor
    surely_signal = lo > t_hi
    maybe_signal = hi > t_lo
    lo_max, hi_max = float(lo[0]), float(hi[0])

    def ratio(signal: float, noise: float, s_max: float) -> float:
        return math.inf if noise == 0.0 or s_max == 0.0 else signal / noise / s_max

    lows, highs = [], []
    if not bool(surely_signal.all()):  # some value may be noise
        lows.append(ratio(float(lo[surely_signal].sum()), float(hi[~surely_signal].sum()), hi_max))
        surely_noise = ~maybe_signal
        noise_min = (
            float(lo[surely_noise].sum())
            if bool(surely_noise.any())
            else float(lo[~surely_signal].min())
        )
        highs.append(ratio(float(hi[maybe_signal].sum()), noise_min, lo_max))
    if bool(maybe_signal.all()):  # every value may be signal: noise is 1.0
        lows.append(ratio(float(lo.sum()), 1.0, hi_max))
        highs.append(ratio(float(hi.sum()), 1.0, lo_max))
    return min(lows), max(highs)


def float32_eigenvalue_bound(
    largest: float, shifted_norm: float | None, short: int, long: int
) -> float:
    """Absolute error bound on each eigenvalue of a ``short x short`` Gram matrix of ``long``
    terms built in float32; solved in float32 after shifting by its mean eigenvalue (pass the
    shifted matrix's norm), or in float64 (``shifted_norm=None``).

    The model: the eigensolver is normwise backward stable on the shifted matrix ``G - mu I``
    (LAPACK Users' Guide, section 4.7: ``p(n) u |G - mu I|``), taken with ``p(n) = n / 2``; the
    float32 Gram product adds ``2 sqrt(long) u |G|``; and the float64 method we certify against
    is itself within ``8 n u64 |G|``. Weyl's inequality turns a backward error into the same
    bound on every eigenvalue. The largest errors measured (Gaussian, heavy-tailed, graded,
    column-scaled, low-rank and outlier spectra, n = 64..4096, MKL on CPU, with and without bf16
    units) were ``0.13 n u |G - mu I|`` and ``0.15 sqrt(long) u |G|``: margins of about 4 and 13.
    It is a model with a margin, not a proof: a proof-grade bound (``gamma_long |A|^T |A|`` for
    the product) is ``n sqrt(long)`` times looser and would certify nothing.
    """
    largest = max(largest, 0.0)
    bound = 2.0 * math.sqrt(long) * UNIT_ROUNDOFF_32 * largest + 8.0 * short * 2.0**-53 * largest
    if shifted_norm is not None:
        bound += 0.5 * short * UNIT_ROUNDOFF_32 * max(shifted_norm, 0.0)
    return bound


def singular_values_exact(weight: torch.Tensor) -> torch.Tensor:
    """``svdvals`` in float32, as the reference computes them.

    A wide matrix is transposed first: same singular values, 3-5x cheaper in LAPACK.
    """
    import torch

    w = weight.detach().to(torch.float32)
    if w.ndim == 1:
        w = w[None, :]
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight holds non-finite values (inf or NaN)")
    if w.shape[0] < w.shape[1]:
        w = w.T
    return torch.linalg.svdvals(w)


class GramAccumulator:
    """Builds the smaller Gram matrix of an ``n x m`` weight from chunks along its long side.

    Feed chunks of shape ``(k, short)``: row blocks of a tall weight, or transposed column blocks of
    a wide one. ``singular_values()`` then returns ``sqrt(eigvalsh(G))`` in descending order;
    ``shifted_eigenvalues()`` is the float32 path.
    """

    def __init__(
        self,
        short: int,
        device: torch.device | str = "cpu",
        block: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        import torch

        self.short = short
        # Measured on 2 AVX-512 cores: 256-wide blocks are fastest up to ~2k, 512 above.
        self.block = block or (256 if short <= 2048 else 512)
        self.device = torch.device(device)
        self.dtype = dtype or torch.float64
        self.gram = torch.zeros(short, short, dtype=self.dtype, device=self.device)

    def add(self, chunk: torch.Tensor) -> None:
        """Accumulate ``chunk.T @ chunk`` (lower block triangle only)."""
        c = chunk.to(self.device, non_blocking=True).to(self.dtype)
        if c.shape[1] != self.short:
            raise ValueError(f"chunk has {c.shape[1]} columns, expected {self.short}")
        g, b = self.gram, self.block
        if self.device.type != "cpu" or self.short <= b:
            # A GPU does the whole product faster than many small launches.
            g.addmm_(c.T, c)
            return
        for start in range(0, self.short, b):
            g[start:, start : start + b].addmm_(c[:, start:].T, c[:, start : start + b])

    def _check_finite(self) -> None:
        import torch

        if not bool(torch.isfinite(self.gram).all()):
            raise ValueError("the weight holds non-finite values (inf or NaN)")

    def singular_values(self) -> torch.Tensor:
        """Singular values, descending, in float64 (on the accumulator's device)."""
        return self.eigenvalues(self.device).clamp_min_(0.0).sqrt_()

    def eigenvalues(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Eigenvalues (descending, float64, on ``device``) of the Gram matrix promoted to
        float64: no float32 eigensolver error, only the Gram's own rounding."""
        import torch

        self._check_finite()
        eig = torch.linalg.eigvalsh(self.gram.to(torch.float64), UPLO="L").to(device)
        return torch.flip(eig, dims=(0,))

    def shifted_eigenvalues(self) -> tuple[torch.Tensor, float]:
        """Eigenvalues (descending, float64, on the CPU) of the Gram matrix solved in its own
        dtype after subtracting the mean eigenvalue ``mu`` from the diagonal, and the 2-norm of
        the shifted matrix. The shift makes the float32 eigensolver's error ~15x smaller on
        weight spectra (its error scales with the norm of what it solves)."""
        import torch

        self._check_finite()
        diagonal = torch.diagonal(self.gram)
        mu = float(diagonal.to(torch.float64).sum()) / self.short
        diagonal.sub_(mu)
        eig = torch.linalg.eigvalsh(self.gram, UPLO="L").to("cpu", torch.float64)
        shifted_norm = max(abs(float(eig[0])), abs(float(eig[-1])))
        return torch.flip(eig + mu, dims=(0,)), shifted_norm
