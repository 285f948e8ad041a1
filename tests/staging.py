"""Plan a job and stage it (unless a dry run), as the launch path does before it submits:
tests that inspect a staged request and the S3 objects it left, without sending it."""

from __future__ import annotations

from typing import Any

from spectrum_sm.aws.pipeline import plan_analysis, plan_training


def prepare_analysis(config, *, dry_run: bool, local: bool) -> dict[str, Any]:
    job = plan_analysis(config, dry_run=dry_run, local=local)
    if not dry_run:
        job.stage()
    return job.request


def prepare_training(config, *, spectrum_uri, dry_run: bool, local: bool) -> dict[str, Any]:
    job = plan_training(config, spectrum_uri=spectrum_uri, dry_run=dry_run, local=local)
    if not dry_run:
        job.stage()
    return job.request


def load_entrypoint(name: str):
    """``entrypoints/<name>.py`` as a module, as the job's code channel ships it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "entrypoints" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
