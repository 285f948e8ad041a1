"""spectrum-sm: Spectrum fine-tuning (SNR-selected layers) on Amazon SageMaker, and locally.

Heavy modules (torch, transformers, boto3, sagemaker) load only when the function that needs them
is called, so ``import spectrum_sm`` and ``spectrum-sm --help`` stay instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core.version import __version__

_LAZY = {
    "scan": "spectrum_sm.api",
    "select": "spectrum_sm.api",
    "SpectrumError": "spectrum_sm.core.errors",
    "ScanResult": "spectrum_sm.core.scanner",
    "select_layers": "spectrum_sm.core.selection",
    "load_results": "spectrum_sm.core.selection",
    "freeze_except": "spectrum_sm.core.freeze",
    "merge_slices": "spectrum_sm.core.slices",
    "load_pipeline": "spectrum_sm.aws.config",
    "launch": "spectrum_sm.aws.pipeline",
    "run_pipeline": "spectrum_sm.aws.pipeline",
    "TrainingJob": "spectrum_sm.aws.jobs",
    "submit": "spectrum_sm.aws.jobs",
    "check_data": "spectrum_sm.api",
    "compare": "spectrum_sm.comparison",
    "collect": "spectrum_sm.comparison",
}

if TYPE_CHECKING:
    from .api import check_data, scan, select
    from .aws.config import load_pipeline
    from .aws.jobs import TrainingJob, submit
    from .aws.pipeline import launch, run_pipeline
    from .comparison import collect, compare
    from .core.errors import SpectrumError
    from .core.freeze import freeze_except
    from .core.scanner import ScanResult
    from .core.selection import load_results, select_layers
    from .core.slices import merge_slices

__all__ = [
    "ScanResult",
    "SpectrumError",
    "TrainingJob",
    "__version__",
    "check_data",
    "collect",
    "compare",
    "freeze_except",
    "launch",
    "load_pipeline",
    "load_results",
    "merge_slices",
    "run_pipeline",
    "scan",
    "select",
    "select_layers",
    "submit",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spectrum_sm' has no attribute {name!r}")
