"""Spectrum at several percents against LoRA, QLoRA and full fine-tuning, on the same data.

:func:`compare` runs one training job per method with everything else equal (data, validation
set, sequence length, steps, batch, seed, instance), after one shared analysis that writes a
layer file per Spectrum percent from a single scan. Jobs run in parallel on SageMaker and one
after another locally. Each finished run is then *collected* from what the job itself left:
``training_report.json`` next to the model (trainable parameters, final validation loss,
tokens/s, peak memory), its TensorBoard files in S3 (loss curves; the metric lines of its log
when there are none) and the job's description (wall and billable seconds). Cost is billable
seconds x the instance's price from :mod:`spectrum_sm.prices`.

:func:`collect` rebuilds the same table and figure later from finished jobs' names.

Modules, each importing only those before it: ``methods`` (the ``--methods``/``--method-set``
grammar, a run's record) <- ``render`` (table, figure, files) <- ``collection`` (finished jobs)
<- ``run`` (the jobs).
"""

from __future__ import annotations

from .collection import collect
from .methods import DEFAULT_METHODS, METHODS, Method, Run, parse_method_settings, parse_methods
from .render import Comparison, render_table
from .run import compare, qlora_problem

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "Comparison",
    "Method",
    "Run",
    "collect",
    "compare",
    "parse_method_settings",
    "parse_methods",
    "qlora_problem",
    "render_table",
]
