"""``spectrum-sm demo``: the whole pipeline on this machine, no AWS account needed.

Builds a small Qwen3-architecture model and a chat dataset, starts an in-process S3 (moto) unless
``AWS_ENDPOINT_URL`` already points somewhere, runs the analysis and training jobs in local mode
through the container contract, downloads the results and reports what was trained.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .core.selection import DEFAULT_TOP_PERCENT

log = logging.getLogger(__name__)
BUCKET = "spectrum-sm-demo"


def start_embedded_s3():
    """Start an in-process moto server and point boto3 at it; returns the server (``.stop()``).

    For notebooks and the demo: nothing is sent anywhere but this process.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_DEFAULT_REGION="us-east-1",
    )
    log.info("embedded S3 (moto) at %s", os.environ["AWS_ENDPOINT_URL"])
    return server


@contextlib.contextmanager
def embedded_s3() -> Iterator[str]:
    """An in-process moto server for the duration; the AWS environment is restored after."""
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in keys}
    server = start_embedded_s3()
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for key in keys:
            os.environ.pop(key, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _check_endpoint(url: str) -> None:
    """A configured endpoint that does not answer fails in seconds, not after boto's retries."""
    from urllib.parse import urlparse

    from .core.errors import SpectrumError

    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=3).close()
    except OSError as exc:
        raise SpectrumError(
            f"AWS_ENDPOINT_URL {url} does not answer ({exc.strerror or exc}); start that server, "
            "or unset AWS_ENDPOINT_URL to use the demo's own in-process S3"
        ) from None


def run_demo(
    workdir: str | Path, *, steps: int = 30, top_percent: float = DEFAULT_TOP_PERCENT
) -> dict[str, Any]:
    """Run the demo in ``workdir``; returns where everything is."""
    from .aws.config import AnalysisConfig, PipelineConfig, TrainingConfig
    from .aws.pipeline import launch
    from .aws.s3 import describe_client_error, download_prefix, s3_client
    from .core.atomic import ensure_output_dir
    from .core.selection import load_results, select_layers
    from .report import snr_report
    from .toy import make_toy_training_setup

    workdir = ensure_output_dir(Path(workdir).resolve())
    configured = os.environ.get("AWS_ENDPOINT_URL")
    if configured:
        _check_endpoint(configured)
    log.info("building a small Qwen3 model and a chat dataset in %s", workdir / "inputs")
    paths = make_toy_training_setup(workdir / "inputs", layers=4, rows=96)
    # The configured S3 endpoint, or an embedded moto server for the duration.
    with contextlib.nullcontext(configured) if configured else embedded_s3() as endpoint:
        client = s3_client()
        try:
            client.create_bucket(Bucket=BUCKET)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except Exception as exc:  # credentials, endpoint: one line
            raise describe_client_error(exc, f"creating s3://{BUCKET} at {endpoint}") from exc
        model = str(paths["model"])
        common = {"output_s3": f"s3://{BUCKET}/demo", "base_job_name": "demo", "model": model}
        # What the jobs would run on in SageMaker (the scan streams, so a CPU instance does).
        config = PipelineConfig(
            AnalysisConfig(**common, instance_type="ml.m5.xlarge", top_percent=top_percent),
            TrainingConfig(
                **common,
                instance_type="ml.g5.xlarge",
                train_data=str(paths["train"]),
                hyperparameters={
                    "max_steps": steps,
                    "learning_rate": 1e-3,
                    "per_device_train_batch_size": 4,
                    "max_seq_length": 64,
                    "precision": "fp32",
                    "logging_steps": 5,
                },
            ),
            reuse_analysis=False,
        )
        result = launch(config, local=True, workdir=workdir / "jobs")
        analysis_dir, model_dir = workdir / "analysis", workdir / "model"
        download_prefix(result["layer_file_s3"], analysis_dir)
        download_prefix(result["model_s3"], model_dir)
    layer_file = next(analysis_dir.glob("*unfrozenparameters*.yaml"))
    results_file = next(
        p for p in analysis_dir.glob("snr_results_*.json") if not p.name.endswith("_sorted.json")
    )
    report = json.loads((model_dir / "training_report.json").read_text())
    scores = load_results(results_file)
    heatmap = snr_report(results_file, top_percent).save(workdir / "snr_report.png")
    return {
        "base_model": model,
        "train_data": str(paths["train"]),
        "unfrozen_parameters": str(layer_file),
        "snr_results": str(results_file),
        "snr_report": str(heatmap),
        "model_dir": str(model_dir),
        "s3_endpoint": endpoint,
        "layer_file_s3": result["layer_file_s3"],
        "model_s3": result["model_s3"],
        "analysis_job": result["analysis_job"],
        "training_job": result["training_job"],
        "selected_modules": sum(len(v) for v in select_layers(scores, top_percent).values()),
        "scored_modules": len(scores),
        "trainable_params": report["trainable_params"],
        "all_params": report["all_params"],
        "final_train_loss": report["final_train_loss"],
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A short human report: what was scored, selected, trained, and where it all is."""
    from .core.selection import load_results, sorted_results

    lines = [
        f"scored {result['scored_modules']} weights; {result['selected_modules']} selected "
        f"(plus the embeddings)",
        f"trainable params: {result['trainable_params']:,} || all params: "
        f"{result['all_params']:,} || trainable%: "
        f"{100 * result['trainable_params'] / result['all_params']:.2f}",
        f"final train loss: {result['final_train_loss']:.4f}",
        "",
        "top score per type:",
    ]
    for layer_type, modules in sorted_results(load_results(result["snr_results"])).items():
        best, score = next(iter(modules.items()))
        lines.append(f"  {layer_type:28} {best:42} {score:.4f}")
    lines += [
        "",
        f"base model:   {result['base_model']}",
        f"layer file:   {result['unfrozen_parameters']}",
        f"SNR heatmap:  {result['snr_report']}",
        f"fine-tuned:   {result['model_dir']}",
        f"S3 ({result['s3_endpoint']}): {result['layer_file_s3']} and {result['model_s3']}",
    ]
    return lines
