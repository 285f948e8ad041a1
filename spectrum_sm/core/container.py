"""The SageMaker training container contract, as seen from inside a job (no SDK needed)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

log = logging.getLogger(__name__)


def write_failure(reason: str) -> None:
    """Record why the job died, when the output folder exists (SageMaker shows the first 1 KB)."""
    # Where SageMaker reads a job's FailureReason (overridable for tests and local runs).
    path = Path(os.environ.get("SM_OUTPUT_FAILURE", "/opt/ml/output/failure"))
    if path.parent.is_dir():
        path.write_text(reason[:1024])


def env_path(name: str) -> str | None:
    """An ``SM_*`` folder from the environment, or None."""
    return os.environ.get(name) or None


def in_container() -> bool:
    """Whether this process runs inside a training job (ours or SageMaker's launcher sets
    ``SM_CURRENT_HOST``; SageMaker sets ``TRAINING_JOB_NAME``), not by hand on a workstation
    where an ``/opt/ml`` folder may exist for other reasons."""
    return bool(os.environ.get("SM_CURRENT_HOST") or os.environ.get("TRAINING_JOB_NAME"))


def default_checkpoint_dir() -> str | None:
    """``/opt/ml/checkpoints`` inside a SageMaker job (synced to S3 for spot training); no
    default outside one."""
    return os.environ.get("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints") if in_container() else None


def kill_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``); usable as
    a ``preexec_fn``. Elsewhere nothing happens."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
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
        os.kill(os.getpid(), signal.SIGKILL)


def exit_job(code: int) -> NoReturn:
    """End a job's process with ``code``, skipping interpreter teardown in a multi-process run.

    A gloo worker thread can still hold the last reference to a finished collective (a barrier
    keeps the all-gathers queued before it) when the main thread returns. If it lets go while
    Python finalizes, freeing the collective's tensors needs the GIL, the thread is unwound, and
    C++ aborts the process ("terminate called without an active exception", SIGABRT): a job
    that trained and saved would fail. Seen under load about once in 16 FSDP2 runs on 2 CPU
    processes; the core dump shows ``~AsyncBarrierWork`` on a ``ProcessGroupGloo`` thread. The
    model, report and logs are all written and closed by then, so a run with a process group
    flushes what Python still buffers and ends at once. A single process ends normally.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing can reach it
            stream.flush()
    os._exit(code)
