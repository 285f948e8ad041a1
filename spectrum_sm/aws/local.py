"""Local mode: run a CreateTrainingJob request on this machine through the container contract.

The job gets a folder laid out like /opt/ml (input/config/*.json, input/data/<channel>, model,
output, checkpoints), its channels are downloaded from S3 (whatever endpoint boto3 is configured
for, e.g. a moto server via AWS_ENDPOINT_URL), ``entrypoints/launch.py`` runs as a subprocess
exactly as in the container, and the model folder is uploaded to the S3 layout the service uses
(``<S3OutputPath>/<job>/output/model/``, uncompressed). So a pipeline behaves the same locally.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import SpectrumError
from .jobs import JobFailed
from .s3 import describe_client_error, s3_client, split_s3_uri

log = logging.getLogger(__name__)


@dataclass
class LocalJob:
    """What a local run produced (the fields a DescribeTrainingJob would answer)."""

    name: str
    status: str
    root: Path
    model_s3: str
    failure_reason: str = ""
    log_tail: list[str] = field(default_factory=list)


def download_prefix(uri: str, target: Path) -> int:
    """Copy every object under an S3 prefix (or one object) into ``target``; returns the count."""
    bucket, key = split_s3_uri(uri)
    client = s3_client()
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        for page in pages:
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(key) :].lstrip("/") or Path(obj["Key"]).name
                if obj["Key"].endswith("/"):
                    continue
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(dest))
                count += 1
    except SpectrumError:
        raise
    except Exception as exc:
        raise describe_client_error(exc, uri) from exc
    if count == 0:
        raise SpectrumError(f"{uri}: no such S3 object or prefix")
    return count


def upload_folder(folder: Path, uri: str) -> list[str]:
    """Upload every file below ``folder`` under the S3 prefix ``uri``."""
    bucket, key = split_s3_uri(uri)
    key = key.rstrip("/") + "/" if key else ""
    client = s3_client()
    keys = []
    try:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            object_key = key + path.relative_to(folder).as_posix()
            client.upload_file(str(path), bucket, object_key)
            keys.append(f"s3://{bucket}/{object_key}")
    except Exception as exc:
        raise describe_client_error(exc, uri) from exc
    return keys


def _prepare(request: dict[str, Any], root: Path) -> None:
    config = root / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    for sub in ("model", "output/data", "checkpoints", "input/data"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    resources = request["ResourceConfig"]
    if resources["InstanceCount"] != 1:
        raise SpectrumError("local mode runs one instance; set instance_count: 1")
    (config / "hyperparameters.json").write_text(json.dumps(request.get("HyperParameters", {})))
    (config / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "lo"})
    )
    channels = {}
    for channel in request.get("InputDataConfig", []):
        name = channel["ChannelName"]
        source = channel["DataSource"]["S3DataSource"]
        channels[name] = {
            "TrainingInputMode": "File",
            "S3DistributionType": source["S3DataDistributionType"],
            "RecordWrapperType": "None",
        }
        log.info("channel %s <- %s", name, source["S3Uri"])
        download_prefix(source["S3Uri"], root / "input" / "data" / name)
    (config / "inputdataconfig.json").write_text(json.dumps(channels))


def run_local(
    request: dict[str, Any], workdir: str | Path, *, stream_logs: bool = True
) -> LocalJob:
    """Run ``request`` here; raise :class:`SpectrumError` carrying FailureReason if it fails."""
    name = request["TrainingJobName"]
    root = Path(workdir) / name
    if root.exists():
        raise SpectrumError(f"local job folder {root} already exists (job names are unique)")
    _prepare(request, root)
    launcher = root / "input" / "data" / "code" / "entrypoints" / "launch.py"
    if not launcher.is_file():
        raise SpectrumError(f"the code channel has no entrypoints/launch.py ({launcher})")
    env = {
        **os.environ,
        **request.get("Environment", {}),
        "SM_OPT_ML": str(root),
        "SM_TRAINING_JOB_NAME": name,
    }
    cmd = [sys.executable, str(launcher), *request["AlgorithmSpecification"]["ContainerArguments"]]
    log.info("local job %s: %s", name, " ".join(cmd))
    tail: deque[str] = deque(maxlen=40)
    with open(root / "output" / "job.log", "w") as job_log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            job_log.write(line)
            tail.append(line.rstrip("\n"))
            if stream_logs:
                log.info("[%s] %s", name, line.rstrip("\n"))
        code = proc.wait()
    output = request["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    model_s3 = f"{output}/{name}/output/model/"
    failure = root / "output" / "failure"
    if code != 0:
        reason = failure.read_text() if failure.is_file() else f"exit status {code}"
        raise JobFailed(name, "Failed", reason, list(tail))
    upload_folder(root / "model", model_s3)
    tensorboard = request.get("TensorBoardOutputConfig")
    if tensorboard and (root / "output" / "tensorboard").is_dir():
        upload_folder(root / "output" / "tensorboard", tensorboard["S3OutputPath"])
    log.info("local job %s completed; model at %s", name, model_s3)
    return LocalJob(name, "Completed", root, model_s3, "", list(tail))
