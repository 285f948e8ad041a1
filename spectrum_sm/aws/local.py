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

A local job is followed through the same handle interface as a SageMaker one
(:class:`~.jobs.JobHandle`): :class:`LocalJob` reads the folder (``job.json``: the request;
``description.json``: status, times, FailureReason; each host's ``output/job.log``) and S3, and
:class:`Local` is the launcher that plans for this machine and runs jobs here.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from ..core.container import kill_with_parent
from ..core.errors import SpectrumError
from .jobs import TERMINAL, JobHandle, Launcher
from .s3 import download_prefix, read_object, s3_client, split_s3_uri, sse_arguments, upload_folder

log = logging.getLogger(__name__)
#: Written by :meth:`LocalJob.stop` before it signals the runner: the job ends Stopped.
STOP_REQUESTED = "stop-requested"


class LocalJob(JobHandle):
    """A job run (or running) on this machine, read from its folder (see the module's docstring);
    its outputs are in S3 where the runner uploaded them, as for a SageMaker job."""

    billed = False

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        super().__init__(self.folder.name)
        self._read: dict[Path, int] = {}  # log lines already returned, per host's log

    def _roots(self) -> list[Path]:
        """Each host's /opt/ml: the job's folder, or algo-1/, algo-2/, ... for several hosts."""
        hosts = [p for p in self.folder.glob("algo-*") if p.name[5:].isdigit()]
        return sorted(hosts, key=lambda p: int(p.name[5:])) or [self.folder]

    def describe(self) -> dict[str, Any]:
        """The request as run (``job.json``) and what the runner recorded of how it went
        (``description.json``), as DescribeTrainingJob answers both."""
        request, state = self.folder / "job.json", self.folder / "description.json"
        if not request.is_file() and not state.is_file():
            raise SpectrumError(f"no local job {self.name} in {self.folder.parent}")
        description = {
            **(json.loads(request.read_text()) if request.is_file() else {}),
            **(json.loads(state.read_text()) if state.is_file() else {}),
        }
        description["TrainingJobName"] = self.name
        if "TrainingJobStatus" not in description:
            description["TrainingJobStatus"] = "Failed"
            description["FailureReason"] = "the local run recorded no status (description.json)"
        runner = description.pop("LocalRunnerPid", None)
        if description["TrainingJobStatus"] == "InProgress" and not _alive(runner):
            description["TrainingJobStatus"] = "Failed"
            description["FailureReason"] = (
                f"the local runner (pid {runner}) ended without recording how the job ended"
            )
        return description

    def stop(self) -> None:
        """As StopTrainingJob: SIGTERM to the runner, which passes it to every host's launcher
        and records the job Stopped. A job that has ended is refused, as SageMaker does."""
        state = self.folder / "description.json"
        runner = json.loads(state.read_text()).get("LocalRunnerPid") if state.is_file() else None
        status = self.status
        if status != "InProgress" or not _alive(runner):
            raise SpectrumError(f"cannot stop job {self.name}: it is {status}")
        (self.folder / STOP_REQUESTED).touch()
        try:
            os.kill(runner, signal.SIGTERM)
        except OSError as exc:
            raise SpectrumError(f"cannot stop job {self.name}: {exc}") from exc

    def log_events(self, *, from_start: bool = False) -> list[dict[str, Any]]:
        """Each host's ``output/job.log`` (algo-1 first), lines not returned yet; complete
        lines only while the job runs. The file records no times: ``timestamp`` is None."""
        running = None
        events: list[dict[str, Any]] = []
        for root in self._roots():
            path = root / "output" / "job.log"
            if not path.is_file():
                continue
            lines = path.read_text(errors="replace").splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                if running is None:
                    running = self.status not in TERMINAL
                if running:
                    lines.pop()  # still being written
            start = 0 if from_start else self._read.get(path, 0)
            events += [{"timestamp": None, "message": line.rstrip("\n")} for line in lines[start:]]
            self._read[path] = len(lines)
        return events

    @property
    def model_dir(self) -> str:  # type: ignore[override]
        return str(self._roots()[0] / "model")

    @functools.cached_property
    def region(self) -> str:
        """The region of the config the job was staged with (its copy next to the outputs),
        else the environment's."""
        import yaml

        output = self.describe()["OutputDataConfig"]["S3OutputPath"].rstrip("/")
        uri = f"{output}/{self.name}/spectrum-sm-config.yaml"
        try:
            return str(yaml.safe_load(read_object(uri)).get("region", ""))
        except Exception as exc:  # gone or unreadable: the region only prices the run
            log.info("no config copy at %s (%s); region from the environment", uri, exc)
            return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "")


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Local(Launcher):
    """Jobs on this machine, one after another, in folders under ``workdir``."""

    needs_role = False
    launch_waits = True

    def __init__(self, workdir: str | Path = "spectrum-sm-jobs") -> None:
        self.workdir = Path(workdir)

    def processes_per_host(self, config) -> int:
        return config.processes_per_host or 1

    def prepare_training(self, request: dict[str, Any], config) -> None:
        # This machine, not the instance type's GPU count, sets the local process count.
        request["Environment"]["SPECTRUM_SM_NPROC_PER_HOST"] = str(self.processes_per_host(config))

    def qlora_problem(self, instance_type: str) -> str | None:
        probe = (
            "import importlib.util, torch; "
            "print(torch.cuda.is_available(), importlib.util.find_spec('bitsandbytes') is not None)"
        )
        try:
            out = subprocess.run(
                [container_python(), "-c", probe], capture_output=True, text=True, timeout=120
            ).stdout.split()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"cannot check for CUDA here ({exc})"
        if out[:1] != ["True"]:
            return "QLoRA needs a CUDA GPU (4-bit bitsandbytes weights); this machine has none"
        if out[1:2] != ["True"]:
            return "QLoRA needs bitsandbytes, which is not installed here"
        return None

    def launch(self, request: dict[str, Any], *, logs: bool = True) -> LocalJob:
        return run_local(request, self.workdir, stream_logs=logs)

    def attach(self, name: str) -> LocalJob:
        job = LocalJob(self.workdir / name)
        if not (job.folder / "job.json").is_file():
            raise SpectrumError(f"no local job {name} in {job.folder.parent}")
        return job

    def place(self) -> dict[str, str]:
        return {"workdir": str(self.workdir.resolve())}


def _prepare(request: dict[str, Any], root: Path, host: str, hosts: list[str], data: Path) -> None:
    config = root / "input" / "config"
    for sub in ("input/config", "model", "output/data", "checkpoints", "input/data"):
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

    def start(self) -> None:
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
                    pass
                except Exception as exc:
                    log.warning("checkpoint sync of %s failed: %s", path, exc)
                else:
                    self._seen[path] = (stat.st_size, stat.st_mtime)


def run_local(
    request: dict[str, Any], workdir: str | Path, *, stream_logs: bool = True
) -> LocalJob:
    """Run ``request`` here, in the foreground, and return its handle: Completed, or Failed or
    Stopped with its FailureReason (its ``wait`` raises :class:`~.jobs.JobFailed` then, as a
    SageMaker job's does). A request that cannot start (its folder exists, a channel cannot be
    downloaded, no launch.py) raises :class:`SpectrumError`."""
    name = request["TrainingJobName"]
    base = Path(workdir).resolve() / name
    if base.exists():
        raise SpectrumError(f"local job folder {base} already exists (job names are unique)")
    base.mkdir(parents=True)
    # What DescribeTrainingJob would answer: the request as run, and (description.json) how
    # it went: InProgress while this process runs it.
    (base / "job.json").write_text(json.dumps(request, indent=2) + "\n")
    started = time.time()
    _describe(base, "InProgress", started)
    count = request["ResourceConfig"]["InstanceCount"]
    hosts = [f"algo-{i + 1}" for i in range(count)]
    roots = {h: base if count == 1 else base / h for h in hosts}
    first = roots[hosts[0]]
    try:
        for host in hosts:
            _prepare(request, roots[host], host, hosts, first)
        launcher = first / "input" / "data" / "code" / "entrypoints" / "launch.py"
        if not launcher.is_file():
            raise SpectrumError(f"the code channel has no entrypoints/launch.py ({launcher})")
    except Exception as exc:
        _describe(base, "Failed", started, time.time(), str(exc))
        raise
    sync = None
    if request.get("CheckpointConfig"):
        sync = _CheckpointSync(
            request["CheckpointConfig"]["S3Uri"], [roots[h] / "checkpoints" for h in hosts]
        )
        sync.start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tail: deque[str] = deque(maxlen=40)
    procs = {}
    try:
        for host in hosts:
            env = {
                # This machine's Hub cache, not a fresh one per job (launch.py's default there).
                "HF_HOME": str(Path.home() / ".cache" / "huggingface"),
                **{k: v for k, v in os.environ.items() if k not in SHELL_ONLY},
                "HF_TOKEN_PATH": str(roots[host] / "no-hf-login"),
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
    except BaseException as exc:
        _describe(base, "Failed", started, time.time(), f"local runner: {exc!r}")
        raise
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        if sync is not None:
            sync.stop()
    ended = time.time()
    failed = [h for h in hosts if codes[h] != 0]
    if (base / STOP_REQUESTED).is_file():
        _describe(base, "Stopped", started, ended, "stopped on request")
        log.info("local job %s stopped", name)
    elif failed:
        host = failed[0]
        failure = roots[host] / "output" / "failure"
        reason = failure.read_text() if failure.is_file() else f"exit status {codes[host]}"
        _describe(base, "Failed", started, ended, reason)
    else:
        output = request["OutputDataConfig"]["S3OutputPath"].rstrip("/")
        model_s3 = f"{output}/{name}/output/model/"
        # As the service does: outputs encrypted with the job's output key, when it has one.
        extra = sse_arguments(request["OutputDataConfig"].get("KmsKeyId", ""))
        tensorboard = request.get("TensorBoardOutputConfig")
        board = first / "output" / "tensorboard"
        try:
            upload_folder(first / "model", model_s3, extra_args=extra)
            if tensorboard and board.is_dir():
                upload_folder(board, tensorboard["S3OutputPath"], extra_args=extra)
        except Exception as exc:
            _describe(base, "Failed", started, ended, f"uploading the outputs: {exc}")
            raise
        _describe(base, "Completed", started, ended)
        log.info("local job %s completed; model at %s", name, model_s3)
    job = LocalJob(base)
    if stream_logs:
        job.log_events()  # echoed as they came: not new to this handle
    job._log_tail = list(tail)  # the hosts' last lines, in the order they came
    return job


def _describe(
    base: Path, status: str, started: float, ended: float | None = None, reason: str = ""
) -> None:
    """``description.json``: the DescribeTrainingJob fields a local run can answer; while it
    runs, the runner's pid (to stop it, and to tell a run that died from one in progress)."""

    def iso(stamp: float) -> str:
        return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat()

    description: dict[str, Any] = {
        "TrainingJobName": base.name,
        "TrainingJobStatus": status,
        "TrainingStartTime": iso(started),
    }
    if ended is None:
        description["LocalRunnerPid"] = os.getpid()
    else:
        description["TrainingEndTime"] = iso(ended)
        description["TrainingTimeInSeconds"] = max(1, round(ended - started))
        description["TrainingWallSeconds"] = round(ended - started, 3)
    if reason:
        description["FailureReason"] = reason
    partial = base / ".description.json.partial"  # a reader never sees half a file
    partial.write_text(json.dumps(description, indent=2) + "\n")
    os.replace(partial, base / "description.json")


#: A job on SageMaker never sees the launching user's Hub token; locally it does not either
#: (nor their saved login), so a gated model fails here exactly as it would there:
#: secret_environment is the way in both places.
SHELL_ONLY = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def container_python() -> str:
    """The interpreter that plays the container's: ``SPECTRUM_SM_LOCAL_PYTHON`` (e.g. an
    environment with the training image's packages) or this one."""
    return os.environ.get("SPECTRUM_SM_LOCAL_PYTHON") or sys.executable


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
    # Line-buffered: a handle (this process or another) reads the log while the job runs.
    with open(root / "output" / "job.log", "w", buffering=1) as job_log:
        for line in proc.stdout:
            job_log.write(line)
            tail.append(line.rstrip("\n"))
            if stream_logs:
                log.info("[%s] %s", label, line.rstrip("\n"))
