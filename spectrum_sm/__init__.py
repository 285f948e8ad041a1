"""spectrum-sm: Spectrum fine-tuning (SNR-selected layers) on Amazon SageMaker, and locally.

Heavy modules (torch, transformers, boto3, sagemaker) load only when the function that needs them
is called, so ``import spectrum_sm`` and ``spectrum-sm --help`` stay instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core.version import __version__ as __version__

#: What each name is loaded from, the first time it is asked for.
_LAZY = {
    name: f"spectrum_sm.{module}"
    for module, names in {
        "api": ("scan", "select", "check_data"),
        "core.errors": ("SpectrumError",),
        "core.scanner": ("ScanResult",),
        "core.selection": ("select_layers", "load_results"),
        "core.freeze": ("freeze_except",),
        "core.slices": ("merge_slices",),
        "aws.config": ("load_pipeline",),
        "aws.pipeline": ("launch", "run_pipeline"),
        "aws.jobs": ("TrainingJob", "submit"),
        "comparison": ("compare", "collect"),
    }.items()
    for name in names
}

if TYPE_CHECKING:  # the names as re-exports (``X as X``), for type checkers and editors
    from .api import check_data as check_data
    from .api import scan as scan
    from .api import select as select
    from .aws.config import load_pipeline as load_pipeline
    from .aws.jobs import TrainingJob as TrainingJob
    from .aws.jobs import submit as submit
    from .aws.pipeline import launch as launch
    from .aws.pipeline import run_pipeline as run_pipeline
    from .comparison import collect as collect
    from .comparison import compare as compare
    from .core.errors import SpectrumError as SpectrumError
    from .core.freeze import freeze_except as freeze_except
    from .core.scanner import ScanResult as ScanResult
    from .core.selection import load_results as load_results
    from .core.selection import select_layers as select_layers
    from .core.slices import merge_slices as merge_slices

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spectrum_sm' has no attribute {name!r}")
