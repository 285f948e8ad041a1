"""MXFP4 expert weights (gpt-oss): what they look like in a checkpoint, and their real values.

A gpt-oss checkpoint stores each fused expert parameter ``X`` (``mlp.experts.gate_up_proj``,
``[experts, cols, rows]`` once loaded) as two tensors, the layout of transformers'
``integrations/mxfp4.py``:

- ``X_blocks``, uint8 ``[experts, rows, groups, 16]``: 32 FP4 (E2M1) codes per group, two per
  byte, the low nibble first (element ``2i``), the high nibble second (``2i + 1``);
- ``X_scales``, uint8 ``[experts, rows, groups]``: one E8M0 exponent per group of 32, bias 127.

Value ``k`` of stored row ``r`` is ``FP4[code] * 2**(scale - 127)`` with ``k = 32 * group + j``;
the loaded parameter is the transpose per expert (``[experts, 32 * groups, rows]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: The quantization method of such checkpoints (``quantization_config.quant_method``).
QUANT_METHOD = "mxfp4"
BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
#: Values per shared scale, and bytes per group of them (two 4-bit codes per byte).
GROUP = 32
GROUP_BYTES = GROUP // 2
#: E8M0 exponent bias: a stored 127 is a scale of 1.
SCALE_BIAS = 127
#: The 16 FP4 E2M1 values, by code (sign bit 3, then two exponent bits and one mantissa bit).
_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_VALUES = _MAGNITUDES + tuple(-v for v in _MAGNITUDES)


def base_name(stored: str) -> str | None:
    """``X`` for a stored ``X_blocks`` or ``X_scales``; ``None`` for any other name."""
    for suffix in (BLOCKS_SUFFIX, SCALES_SUFFIX):
        if stored.endswith(suffix):
            return stored[: -len(suffix)]
    return None


def dequantize_rows(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 values of stored rows: ``blocks`` ``[..., groups, 16]`` uint8 and ``scales``
    ``[..., groups]`` uint8 give ``[..., 32 * groups]``, in the stored (pre-transpose) order.

    float32 holds every value exactly (an FP4 value has two significant bits), so these equal
    transformers' bf16 dequantization wherever bf16 can hold the value at all.
    """
    import torch

    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = blocks.to(torch.uint8)
    low = lut[(codes & 0x0F).long()]
    high = lut[(codes >> 4).long()]
    values = torch.stack((low, high), dim=-1).reshape(*codes.shape[:-1], 2 * codes.shape[-1])
    values = torch.ldexp(values, (scales.to(torch.int32) - SCALE_BIAS).unsqueeze(-1))
    return values.reshape(*codes.shape[:-2], codes.shape[-2] * 2 * codes.shape[-1])


def expert_matrix(blocks: torch.Tensor, scales: torch.Tensor, rows_per_step: int) -> torch.Tensor:
    """One expert's weight as the loaded model holds it (``[32 * groups, rows]``, float32,
    contiguous) from its ``blocks`` ``[rows, groups, 16]`` and ``scales`` ``[rows, groups]``,
    dequantized ``rows_per_step`` stored rows at a time (the index tensors of a step are 16
    times its bytes)."""
    import torch

    rows, groups = scales.shape
    out = torch.empty(groups * GROUP, rows, dtype=torch.float32)
    step = max(1, rows_per_step)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        out[:, start:stop] = dequantize_rows(blocks[start:stop], scales[start:stop]).T
    return out


def check_layout(blocks: tuple[int, ...], scales: tuple[int, ...] | None) -> str | None:
    """Why a ``_blocks`` tensor of shape ``blocks`` (with its ``_scales`` of shape ``scales``)
    is not the fused-expert layout above, or ``None`` when it is."""
    if scales is None:
        return "it has no _scales tensor beside it"
    if len(blocks) != 4 or blocks[-1] != GROUP_BYTES:
        return f"shape {list(blocks)} is not [experts, rows, groups, {GROUP_BYTES}]"
    if tuple(scales) != tuple(blocks[:-1]):
        return f"its _scales have shape {list(scales)}, not {list(blocks[:-1])}"
    return None
