"""Spectrum's signal-to-noise score, computed exactly as the reference does, and fast.

The reference (cognitivecomputations/spectrum) takes the singular values ``S`` of a weight ``W``
(``W[None, :]`` when 1-D), estimates the noise level from their inter-quartile range, splits them
at the Marchenko-Pastur edge and scores ``(signal / noise) / S[0]``.

Two ways to get ``S``:

* :func:`singular_values_exact` -- ``torch.linalg.svdvals`` in float32, like the reference.
* :class:`GramAccumulator` -- the square roots of the eigenvalues of the smaller float64 Gram
  matrix, built chunk by chunk straight from the stored dtype. Only the lower block triangle is
  computed (``eigvalsh`` reads no more). float64 matters: a float32 Gram squares the condition
  number in single precision and loses the small singular values that set the quartiles.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Inter-quartile range of a standard normal distribution.
IQR_TO_SIGMA = 1.349


def module_type(module_name: str) -> str:
    """The reference's *type* of a module: its name after the first all-digit component.

    >>> module_type("model.layers.7.mlp.down_proj")
    'mlp.down_proj'
    >>> module_type("lm_head")
    'lm_head'
    """
    parts = module_name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[index + 1 :])
    return module_name


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10`` (the model's own layer order)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def as_matrix_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """The 2-D shape the reference uses: ``(1, m)`` for a 1-D weight."""
    if len(shape) == 1:
        return 1, int(shape[0])
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    raise ValueError(f"expected a 1-D or 2-D weight, got shape {tuple(shape)}")


def snr_from_singular_values(singular_values: torch.Tensor, n: int, m: int) -> float:
    """Spectrum's score from the singular values of an ``n x m`` matrix (any order)."""
    import torch

    s = torch.sort(singular_values.detach().to(torch.float64).flatten(), descending=True).values
    s_max = float(s[0])
    if not math.isfinite(s_max):
        raise ValueError("the weight holds non-finite values (inf or NaN)")
    if s_max == 0.0:
        return 0.0  # an all-zero weight carries no signal; the reference would give 0/0
    q75 = torch.quantile(s, 0.75)
    q25 = torch.quantile(s, 0.25)
    sigma = (q75 - q25) / IQR_TO_SIGMA
    beta = min(n, m) / max(n, m)
    threshold = sigma * (1.0 + math.sqrt(beta))
    above = s > threshold
    signal = float(s[above].sum()) if bool(above.any()) else 0.0
    noise = float(s[~above].sum()) if bool((~above).any()) else 1.0
    if noise == 0.0:
        noise = 1.0  # only zero singular values below the edge: the reference's "empty" case
    return signal / noise / s_max


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
    a wide one. ``singular_values()`` then returns ``sqrt(eigvalsh(G))`` in descending order.
    """

    def __init__(
        self, short: int, device: torch.device | str = "cpu", block: int | None = None
    ) -> None:
        import torch

        self.short = short
        # Measured on 2 AVX-512 cores: 256-wide blocks are fastest up to ~2k, 512 above.
        self.block = block or (256 if short <= 2048 else 512)
        self.device = torch.device(device)
        self.gram = torch.zeros(short, short, dtype=torch.float64, device=self.device)

    def add(self, chunk: torch.Tensor) -> None:
        """Accumulate ``chunk.T @ chunk`` (lower block triangle only)."""
        import torch

        c = chunk.to(self.device, non_blocking=True).to(torch.float64)
        if c.shape[1] != self.short:
            raise ValueError(f"chunk has {c.shape[1]} columns, expected {self.short}")
        g, b = self.gram, self.block
        if self.device.type != "cpu" or self.short <= b:
            # A GPU does the whole product faster than many small launches.
            g.addmm_(c.T, c)
            return
        for start in range(0, self.short, b):
            stop = min(start + b, self.short)
            g[start:, start:stop].addmm_(c[:, start:].T, c[:, start:stop])

    def singular_values(self) -> torch.Tensor:
        """Singular values, descending, in float64 (on the accumulator's device)."""
        import torch

        if not bool(torch.isfinite(self.gram).all()):
            raise ValueError("the weight holds non-finite values (inf or NaN)")
        eig = torch.linalg.eigvalsh(self.gram, UPLO="L")
        return torch.flip(eig.clamp_min_(0.0).sqrt_(), dims=(0,))
