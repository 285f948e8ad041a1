"""The training log lines and the SageMaker metric definitions that parse them.

One line per logging step, fixed keys, ``key=value`` pairs, so a regular expression per metric
captures it from CloudWatch (SageMaker ``MetricDefinitions``).
"""

from __future__ import annotations

import contextlib
import re

NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
#: The step and its loss that start :func:`train_line` and :func:`eval_line` (groups: step,
#: ``train_loss`` or ``eval_loss``, value): what ``compare`` reads from a log without TensorBoard.
STEP_LINE = re.compile(rf"step=(\d+) (train_loss|eval_loss)={NUMBER}")

#: SageMaker MetricDefinitions matching :func:`train_line` and :func:`eval_line`.
METRIC_DEFINITIONS = [
    {"Name": "train:loss", "Regex": rf"train_loss={NUMBER}"},
    {"Name": "train:learning_rate", "Regex": rf"learning_rate={NUMBER}"},
    {"Name": "train:grad_norm", "Regex": rf"grad_norm={NUMBER}"},
    {"Name": "train:tokens_per_sec", "Regex": rf"tokens_per_sec={NUMBER}"},
    {"Name": "train:peak_mem_gb", "Regex": rf"peak_mem_gb={NUMBER}"},
    {"Name": "eval:loss", "Regex": rf"eval_loss={NUMBER}"},
]


def train_line(
    step: int, loss: float, lr: float, grad_norm: float, tokens_per_sec: float, peak_mem_gb: float
) -> str:
    return (
        f"step={step} train_loss={loss:.6f} learning_rate={lr:.6e} grad_norm={grad_norm:.6f} "
        f"tokens_per_sec={tokens_per_sec:.1f} peak_mem_gb={peak_mem_gb:.3f}"
    )


def eval_line(step: int, loss: float) -> str:
    return f"step={step} eval_loss={loss:.6f}"


def peak_memory_bytes() -> int:
    """Peak GPU memory on CUDA, else this process's peak resident memory."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
