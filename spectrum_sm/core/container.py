"""The SageMaker training container contract, as seen from inside a job (no SDK needed)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def failure_file() -> Path:
    """Where SageMaker reads a job's FailureReason (overridable for tests and local runs)."""
    return Path(os.environ.get("SM_OUTPUT_FAILURE", "/opt/ml/output/failure"))


def write_failure(reason: str) -> None:
    """Record why the job died, when the output folder exists (SageMaker shows the first 1 KB)."""
    path = failure_file()
    if path.parent.is_dir():
        path.write_text(reason[:1024])


def env_path(name: str) -> str | None:
    """An ``SM_*`` folder from the environment, or None."""
    value = os.environ.get(name)
    return value or None


def default_checkpoint_dir() -> str | None:
    """``/opt/ml/checkpoints`` inside a SageMaker job (synced to S3 for spot training)."""
    path = os.environ.get("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints")
    return path if Path(path).is_dir() or Path("/opt/ml").is_dir() else None
