"""Local mode: run a CreateTrainingJob request on this machine through the container contract.

The job gets a folder laid out like /opt/ml (input/config/*.json, input/data/<channel>, model,
output, checkpoints), its channels are downloaded from S3 (whatever endpoint boto3 is configured
for, e.g. a moto server via AWS_ENDPOINT_URL), ``entrypoints/launch.py`` runs as a subprocess
exactly as in the container, and the model folder is uploaded to the S3 layout the service uses
(``<S3OutputPath>/<job>/output/model/``, uncompressed). So a pipeline behaves the same locally.

``InstanceCount > 1`` runs one such folder per host (``algo-1/``, ``algo-2/``, ...), each with
its own launch.py, rendezvousing on this machine over gloo. With a ``CheckpointConfig`` every
host's checkpoint folder is filled from the S3 prefix before the start and synced back to it
while the job runs, as SageMaker does, so a killed job's successor resumes from S3.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.container import kill_with_parent
from ..core.errors import SpectrumError
from .jobs import JobFailed
from .s3 import (
    download_prefix,
    s3_client,
    split_s3_uri,
    sse_arguments,
    upload_folder,
)

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


def _prepare(request: dict[str, Any], root: Path, host: str, hosts: list[str], data: Path) -> None:
    config = root / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    for sub in ("model", "output/data", "checkpoints", "input/data"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(request.get("HyperParameters", {})))
    (config / "resourceconfig.json").write_text(
        json.dumps(
            {
                "current_host": host,
                "hosts": hosts,
                "current_instance_type": request["ResourceConfig"]["InstanceType"],
                "network_interface_name": "lo",
            }
        )
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
        target = root / "input" / "data" / name
        if root == data:
            log.info("channel %s <- %s", name, source["S3Uri"])
            download_prefix(source["S3Uri"], target)
        else:  # FullyReplicated: every host sees the same files
            target.symlink_to(data / "input" / "data" / name, target_is_directory=True)
    (config / "inputdataconfig.json").write_text(json.dumps(channels))


class _CheckpointSync:
    """SageMaker's checkpoint contract: restore the S3 prefix into every host's folder at the
    start, then upload new and changed files as they appear (temporary folders left out)."""

    def __init__(self, uri: str, folders: list[Path], every_s: float = 1.0) -> None:
        self.uri, self.folders, self.every_s = uri.rstrip("/") + "/", folders, every_s
        self._seen: dict[Path, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="checkpoint-sync")

    def restore(self) -> None:
        for folder in self.folders:
            try:
                count = download_prefix(self.uri, folder)
            except SpectrumError:
                continue  # nothing there yet
            log.info("restored %d checkpoint files from %s into %s", count, self.uri, folder)
        for folder in self.folders:  # restored files are not new
            for path in folder.rglob("*"):
                if path.is_file():
                    stat = path.stat()
                    self._seen[path] = (stat.st_size, stat.st_mtime)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sync()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sync()

    def sync(self) -> None:
        bucket, key = split_s3_uri(self.uri)
        client = s3_client()
        for folder in self.folders:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                rel = path.relative_to(folder)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # pruned meanwhile
                if self._seen.get(path) == (stat.st_size, stat.st_mtime):
                    continue
                try:
                    client.upload_file(str(path), bucket, key + rel.as_posix())
                except FileNotFoundError:
                    continue
                except Exception as exc:
                    log.warning("checkpoint sync of %s failed: %s", path, exc)
                    continue
                self._seen[path] = (stat.st_size, stat.st_mtime)


def run_local(
    request: dict[str, Any], workdir: str | Path, *, stream_logs: bool = True
) -> LocalJob:
    """Run ``request`` here; raise :class:`SpectrumError` carrying FailureReason if it fails."""
    name = request["TrainingJobName"]
    base = Path(workdir).resolve() / name
    if base.exists():
        raise SpectrumError(f"local job folder {base} already exists (job names are unique)")
    base.mkdir(parents=True)
    # What DescribeTrainingJob would answer: the request as run.
    (base / "job.json").write_text(json.dumps(request, indent=2) + "\n")
    count = request["ResourceConfig"]["InstanceCount"]
    hosts = [f"algo-{i + 1}" for i in range(count)]
    roots = {h: base if count == 1 else base / h for h in hosts}
    first = roots[hosts[0]]
    for host in hosts:
        _prepare(request, roots[host], host, hosts, first)
    launcher = first / "input" / "data" / "code" / "entrypoints" / "launch.py"
    if not launcher.is_file():
        raise SpectrumError(f"the code channel has no entrypoints/launch.py ({launcher})")
    sync = None
    if request.get("CheckpointConfig"):
        sync = _CheckpointSync(
            request["CheckpointConfig"]["S3Uri"], [roots[h] / "checkpoints" for h in hosts]
        )
        sync.restore()
        sync.start()
    port = _free_port()
    started = time.time()
    tail: deque[str] = deque(maxlen=40)
    procs = {}
    try:
        for host in hosts:
            env = {
                **_job_environment(roots[host]),
                **request.get("Environment", {}),
                "SM_OPT_ML": str(roots[host]),
                "SM_TRAINING_JOB_NAME": name,
                "SPECTRUM_SM_MASTER_ADDR": "127.0.0.1",
                "SPECTRUM_SM_MASTER_PORT": str(port),
            }
            cmd = [
                container_python(),
                str(roots[host] / "input" / "data" / "code" / "entrypoints" / "launch.py"),
                *request["AlgorithmSpecification"]["ContainerArguments"],
            ]
            log.info("local job %s, %s: %s", name, host, " ".join(cmd))
            procs[host] = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=roots[host],
                preexec_fn=kill_with_parent,
            )
        codes = _follow(procs, roots, name, tail, stream_logs)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        if sync is not None:
            sync.stop()
    ended = time.time()
    output = request["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    model_s3 = f"{output}/{name}/output/model/"
    failed = [h for h in hosts if codes[h] != 0]
    if failed:
        host = failed[0]
        failure = roots[host] / "output" / "failure"
        reason = failure.read_text() if failure.is_file() else f"exit status {codes[host]}"
        _describe(base, "Failed", started, ended, reason)
        raise JobFailed(name, "Failed", reason, list(tail))
    # As the service does: outputs encrypted with the job's output key, when it has one.
    extra = sse_arguments(request["OutputDataConfig"].get("KmsKeyId", ""))
    upload_folder(first / "model", model_s3, extra_args=extra)
    tensorboard = request.get("TensorBoardOutputConfig")
    if tensorboard and (first / "output" / "tensorboard").is_dir():
        upload_folder(
            first / "output" / "tensorboard", tensorboard["S3OutputPath"], extra_args=extra
        )
    _describe(base, "Completed", started, ended)
    log.info("local job %s completed; model at %s", name, model_s3)
    return LocalJob(name, "Completed", first, model_s3, "", list(tail))


def _describe(base: Path, status: str, started: float, ended: float, reason: str = "") -> None:
    """``description.json``: the DescribeTrainingJob fields a local run can answer (status,
    times), so a finished local job can be collected later like a SageMaker one."""
    import datetime as dt

    def iso(stamp: float) -> str:
        return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat()

    description = {
        "TrainingJobName": base.name,
        "TrainingJobStatus": status,
        "TrainingStartTime": iso(started),
        "TrainingEndTime": iso(ended),
        "TrainingTimeInSeconds": max(1, round(ended - started)),
        "TrainingWallSeconds": round(ended - started, 3),
    }
    if reason:
        description["FailureReason"] = reason
    (base / "description.json").write_text(json.dumps(description, indent=2) + "\n")


#: A job on SageMaker never sees the launching user's Hub token; locally it does not either
#: (nor their saved login), so a gated model fails here exactly as it would there:
#: secret_environment is the way in both places.
SHELL_ONLY = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def container_python() -> str:
    """The interpreter that plays the container's: ``SPECTRUM_SM_LOCAL_PYTHON`` (e.g. an
    environment with the training image's packages) or this one."""
    return os.environ.get("SPECTRUM_SM_LOCAL_PYTHON") or sys.executable


def _job_environment(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SHELL_ONLY}
    env["HF_TOKEN_PATH"] = str(root / "no-hf-login")
    # This machine's Hub cache, not a fresh one per job (launch.py's default in a container).
    env.setdefault("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return env


def _follow(procs, roots, name: str, tail: deque, stream_logs: bool) -> dict[str, int]:
    """Stream every host's log into its output/job.log (and ours); pass SIGTERM and SIGINT on
    to every host's launcher, as SageMaker stops every instance of a job."""

    def forward(signum, _frame):
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    readers = []
    try:
        for host, proc in procs.items():
            thread = threading.Thread(
                target=_pump, args=(proc, roots[host], host, name, tail, stream_logs), daemon=True
            )
            thread.start()
            readers.append(thread)
        codes = {host: proc.wait() for host, proc in procs.items()}
        for thread in readers:
            thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return codes


def _pump(proc, root: Path, host: str, name: str, tail: deque, stream_logs: bool) -> None:
    label = name if host == "algo-1" else f"{name}/{host}"
    with open(root / "output" / "job.log", "w") as job_log:
        for line in proc.stdout:
            job_log.write(line)
            tail.append(line.rstrip("\n"))
            if stream_logs:
                log.info("[%s] %s", label, line.rstrip("\n"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
