"""Following jobs: one handle interface (:class:`JobHandle`: describe, wait with logs, stop,
outputs) for SageMaker jobs (:class:`TrainingJob`, over boto3) and local ones, and the choice of
where jobs run (:class:`Launcher`).

Jobs are sent by :func:`submit` through the SageMaker SDK v3 (:mod:`.sdk`). Following stays
ours: the SDK's ``TrainingJob.wait`` draws a live panel (not for pipes or notebooks' logs),
treats Stopped as success and gives no log tail on failure. boto3 loads only when a job is
submitted or attached, and follows the usual configuration (region, profile,
``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from ..core.errors import SpectrumError
from ..core.instances import has_cuda
from .s3 import s3_client, s3_errors, split_s3_uri

log = logging.getLogger(__name__)
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL = {"Completed", "Failed", "Stopped"}


class JobFailed(SpectrumError):
    """A job ended Failed or Stopped; carries its FailureReason and last log lines."""

    def __init__(self, name: str, status: str, reason: str, log_tail: list[str]) -> None:
        self.name, self.status, self.reason, self.log_tail = name, status, reason, log_tail
        last = "\n".join(log_tail[-10:])
        super().__init__(
            f"job {name} {status.lower()}: {reason.strip() or 'no reason given'}"
            + (f"\nlast log lines:\n{last}" if last else "")
        )


class JobTimeout(SpectrumError):
    """The job did not finish within the time ``wait`` was given (it keeps running)."""


def _client(service: str):
    import boto3

    return boto3.client(service)


class JobHandle:
    """One job, wherever it runs: ``describe``, ``status``, ``wait(logs=True)``, ``stop``,
    ``log_events``, ``outputs``, ``layer_file``, ``snr_table``.

    :class:`TrainingJob` asks SageMaker; :class:`~spectrum_sm.aws.local.LocalJob` reads the
    folder the local runner writes. ``describe`` answers DescribeTrainingJob's fields (the
    request as sent, ``TrainingJobStatus``, ``FailureReason``, times), so everything above the
    launcher reads a job one way.
    """

    name: str
    #: The service bills the job: its ``BillableTimeInSeconds`` prices it. A local run has no
    #: bill; its cost is an estimate from wall time.
    billed = True
    #: Where the trained model is on this machine ("" when only in S3).
    model_dir = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self._log_tail: list[str] = []

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def log_events(self, *, from_start: bool = False) -> list[dict[str, Any]]:
        """Log events this handle has not returned yet (all of them, from the start, with
        ``from_start``), across the job's hosts: ``message`` and ``timestamp`` (ms since the
        epoch; None where the job recorded no time, as in a local job's log file)."""
        raise NotImplementedError

    @property
    def status(self) -> str:
        return self.describe()["TrainingJobStatus"]

    @property
    def region(self) -> str:
        """The job's region, from its ARN ("" when it has none)."""
        parts = self.describe().get("TrainingJobArn", "").split(":")
        return parts[3] if len(parts) > 3 else ""

    def wait(
        self,
        *,
        logs: bool = True,
        poll_s: float = 15.0,
        timeout_s: float | None = None,
        echo: Callable[[str], None] = print,
    ) -> dict[str, Any]:
        """Block until the job ends (a finished one returns at once); echo its log lines not
        seen yet when ``logs``.

        Raises :class:`JobFailed` (FailureReason and last log lines) when it fails or is stopped,
        :class:`JobTimeout` when ``timeout_s`` passes first.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            description = self.describe()
            if logs:
                self._echo_new_lines(echo)
            status = description["TrainingJobStatus"]
            if status in TERMINAL:
                if logs:
                    self._echo_new_lines(echo)
                if status != "Completed":
                    if not self._log_tail:
                        events = self.log_events(from_start=True)
                        self._log_tail = [event["message"] for event in events][-40:]
                    reason = description.get("FailureReason", "")
                    raise JobFailed(self.name, status, reason, self._log_tail)
                return description
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"job {self.name} still {status} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def _echo_new_lines(self, echo: Callable[[str], None]) -> None:
        """Echo the lines not seen yet, across the job's hosts."""
        lines = [event["message"] for event in self.log_events()]
        self._log_tail = (self._log_tail + lines)[-40:]
        for line in lines:
            echo(line)

    @property
    def outputs(self) -> dict[str, str]:
        """S3 URIs of the job's results (``model`` is a folder: outputs are uncompressed)."""
        description = self.describe()
        root = description["OutputDataConfig"]["S3OutputPath"].rstrip("/")
        output = f"{root}/{self.name}/output/"
        uris = {"model": output + "model/", "output": output}
        if checkpoint := description.get("CheckpointConfig", {}).get("S3Uri"):
            uris["checkpoints"] = checkpoint
        return uris

    def _read_output(self, wanted: Callable[[str], bool], what: str) -> str:
        """The text of the one output file whose name ``wanted`` accepts."""
        model_uri = self.outputs["model"]
        bucket, key = split_s3_uri(model_uri)
        client = s3_client()
        with s3_errors(model_uri):
            listing = client.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
            match = [o["Key"] for o in listing if wanted(o["Key"].rsplit("/", 1)[-1])]
            if len(match) != 1:
                raise SpectrumError(f"{model_uri}: expected one {what}, found {len(match)}")
            return client.get_object(Bucket=bucket, Key=match[0])["Body"].read().decode()

    def layer_file(self) -> list[str]:
        """An analysis job's layer list, read from S3."""
        import yaml

        text = self._read_output(lambda name: name.endswith("percent.yaml"), "layer file")
        return yaml.safe_load(text)["unfrozen_parameters"]

    def snr_table(self) -> dict[str, dict[str, Any]]:
        """An analysis job's score table (``{module: {"snr", "type"}}``), read from S3."""
        text = self._read_output(
            lambda name: (
                name.startswith("snr_results_")
                and name.endswith(".json")
                and not name.endswith("_sorted.json")
            ),
            "snr_results_*.json",
        )
        return json.loads(text)


class TrainingJob(JobHandle):
    """A SageMaker training job, followed over boto3 (CloudWatch for its logs)."""

    def __init__(self, name: str, sagemaker=None, logs=None) -> None:
        super().__init__(name)
        self._sm = sagemaker or _client("sagemaker")
        self._logs = logs
        self._tokens: dict[str, str] = {}

    @classmethod
    def attach(cls, name: str) -> TrainingJob:
        """A handle on an existing job (from another process or notebook)."""
        job = cls(name)
        job.describe()
        return job

    def describe(self) -> dict[str, Any]:
        try:
            return self._sm.describe_training_job(TrainingJobName=self.name)
        except Exception as exc:
            raise SpectrumError(f"cannot describe job {self.name}: {exc}") from exc

    def stop(self) -> None:
        try:
            self._sm.stop_training_job(TrainingJobName=self.name)
        except Exception as exc:
            raise SpectrumError(f"cannot stop job {self.name}: {exc}") from exc

    def log_events(self, *, from_start: bool = False) -> list[dict[str, Any]]:
        """CloudWatch events (``timestamp`` in ms, ``message``) across the job's log streams (one
        per instance), each read to its end."""
        if from_start:
            self._tokens.clear()
        if self._logs is None:
            self._logs = _client("logs")
        client = self._logs
        events: list[dict[str, Any]] = []
        try:
            streams = client.describe_log_streams(
                logGroupName=LOG_GROUP, logStreamNamePrefix=self.name + "/"
            ).get("logStreams", [])
        except Exception:  # no log group yet (the job has not started): nothing to show
            return events
        for stream in streams:
            name = stream["logStreamName"]
            while True:
                kwargs = {"logGroupName": LOG_GROUP, "logStreamName": name, "startFromHead": True}
                if name in self._tokens:
                    kwargs["nextToken"] = self._tokens[name]
                response = client.get_log_events(**kwargs)
                self._tokens[name] = response["nextForwardToken"]
                page = response.get("events", [])
                events += page
                if not page:  # the stream's end (for now): the same token comes back
                    break
        return events


class Launcher:
    """Where jobs run, chosen once (:func:`spectrum_sm.aws.pipeline.launcher_for`): SageMaker
    (:class:`SageMaker`) or this machine (:class:`~spectrum_sm.aws.local.Local`). Planning asks
    it what the place needs; ``launch`` sends a staged request and gives its :class:`JobHandle`,
    and everything after reads the handle."""

    #: Requests name an execution role (SageMaker assumes it; a local run needs none).
    needs_role = True
    #: ``launch`` returns only once the job has ended (this machine runs it in the foreground),
    #: so not waiting changes nothing.
    launch_waits = False

    def processes_per_host(self, config) -> int:
        """How many training processes each host of ``config`` runs."""
        raise NotImplementedError

    def prepare_training(self, request: dict[str, Any], config) -> None:
        """What a training request needs here beyond what the request builder wrote."""

    def qlora_problem(self, instance_type: str) -> str | None:
        """Why QLoRA (4-bit bitsandbytes weights on CUDA) cannot run here, or None."""
        raise NotImplementedError

    def launch(self, request: dict[str, Any], *, logs: bool = True) -> JobHandle:
        """Start a staged request; a job that then fails is reported by its handle."""
        raise NotImplementedError

    def attach(self, name: str) -> JobHandle:
        """A handle on an existing job, by name."""
        raise NotImplementedError

    def place(self) -> dict[str, str]:
        """What a caller needs to find the jobs again, besides their names."""
        return {}


class SageMaker(Launcher):
    """Jobs on SageMaker: sent by :func:`submit`, followed by :class:`TrainingJob`."""

    def __init__(self, boto_session=None) -> None:
        self._session = boto_session

    def processes_per_host(self, config) -> int:
        return config.gpus_per_host()

    def qlora_problem(self, instance_type: str) -> str | None:
        if not has_cuda(instance_type):
            return f"QLoRA needs a CUDA GPU; {instance_type} has none"
        return None

    def launch(self, request: dict[str, Any], *, logs: bool = True) -> TrainingJob:
        return submit(request, self._session)

    def attach(self, name: str) -> TrainingJob:
        if self._session is not None:
            return TrainingJob(name, sagemaker=self._session.client("sagemaker"))
        return TrainingJob(name)


def submit(request: dict[str, Any], boto_session=None) -> TrainingJob:
    """Validate, then send a CreateTrainingJob request, exactly as prepared, through the
    SageMaker SDK v3's typed resource layer (see :mod:`.sdk`)."""
    import boto3

    from .sdk import launch

    session = boto_session or boto3.Session()
    launch(request, session)
    return TrainingJob(request["TrainingJobName"], sagemaker=session.client("sagemaker"))
