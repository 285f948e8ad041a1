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


def in_container() -> bool:
    """Whether this process runs inside a training job (ours or SageMaker's launcher sets
    ``SM_CURRENT_HOST``; SageMaker sets ``TRAINING_JOB_NAME``), not by hand on a workstation
    where an ``/opt/ml`` folder may exist for other reasons."""
    return bool(os.environ.get("SM_CURRENT_HOST") or os.environ.get("TRAINING_JOB_NAME"))


def default_checkpoint_dir() -> str | None:
    """``/opt/ml/checkpoints`` inside a SageMaker job (synced to S3 for spot training); no
    default outside one."""
    if not in_container():
        return None
    return os.environ.get("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints")


def kill_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``); usable as
    a ``preexec_fn``. Elsewhere nothing happens."""
    try:
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError) as exc:
        log.debug("no parent-death signal: %s", exc)


def die_with_parent() -> None:
    """Under torchrun, end this worker when torchrun ends, however it ends.

    torchrun starts every worker in a session of its own, so a ``kill -9`` of torchrun's process
    group (or of torchrun alone) would leave the workers training on, orphaned, and a restarted
    run would race them. Linux's parent-death signal closes that gap; elsewhere nothing happens.
    """
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    kill_with_parent()
    if os.getppid() == 1:  # torchrun died before the signal was armed
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
