"""Loading a quantized checkpoint in a form training can update.

gpt-oss is published in MXFP4 (packed 4-bit expert weights, :mod:`spectrum_sm.core.mxfp4`).
transformers loads that packed, for its Triton kernels, wherever a GPU, Triton and the
``kernels`` package allow it: weights that no optimizer can update. Asked for
``Mxfp4Config(dequantize=True)``, it dequantizes the experts while loading instead (on CPU and
on any GPU, no kernels needed), into the ``dtype`` given to ``from_pretrained``: bf16 for
Spectrum's default bf16 training. Spectrum then trains the selected experts like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.mxfp4 import QUANT_METHOD


def quantization_method(config: Mapping[str, Any] | Any) -> str:
    """The checkpoint's ``quantization_config.quant_method`` (lower case), or ``""``; from
    ``config.json`` as a dict or from a transformers config object."""

    def field(obj, name: str):
        return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)

    method = field(field(config, "quantization_config"), "quant_method")
    return str(getattr(method, "value", method) or "").lower()


def dequantized_load_kwargs(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Extra ``from_pretrained`` keyword arguments that load this checkpoint with real,
    trainable weights: for MXFP4 (gpt-oss), ``quantization_config=Mxfp4Config(dequantize=True)``
    (the experts land in the ``dtype`` passed beside it); nothing for any other checkpoint."""
    if quantization_method(config) != QUANT_METHOD:
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}
