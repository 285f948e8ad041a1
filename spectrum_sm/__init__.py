"""spectrum-sm: Spectrum fine-tuning (SNR-selected layers) on Amazon SageMaker, and locally.

Heavy modules (torch, transformers, boto3, sagemaker) load only when the function that needs them
is called, so ``import spectrum_sm`` and ``spectrum-sm --help`` stay instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "scan": "spectrum_sm.api",
    "select": "spectrum_sm.api",
    "SpectrumError": "spectrum_sm.core.errors",
    "ScanResult": "spectrum_sm.core.scanner",
    "select_layers": "spectrum_sm.core.selection",
    "load_results": "spectrum_sm.core.selection",
}

if TYPE_CHECKING:
    from .api import scan, select
    from .core.errors import SpectrumError
    from .core.scanner import ScanResult
    from .core.selection import load_results, select_layers

__all__ = [
    "ScanResult",
    "SpectrumError",
    "__version__",
    "load_results",
    "scan",
    "select",
    "select_layers",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spectrum_sm' has no attribute {name!r}")
