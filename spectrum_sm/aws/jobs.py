"""Following SageMaker jobs: a small job handle over boto3 (describe, wait with logs, stop).

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
from .s3 import describe_client_error, s3_client, split_s3_uri

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


class TrainingJob:
    """A SageMaker training job: ``describe``, ``wait(logs=True)``, ``stop``, ``outputs``."""

    def __init__(self, name: str, sagemaker=None, logs=None) -> None:
        self.name = name
        self._sm = sagemaker or _client("sagemaker")
        self._logs = logs
        self._log_tail: list[str] = []
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

    @property
    def status(self) -> str:
        return self.describe()["TrainingJobStatus"]

    def stop(self) -> None:
        try:
            self._sm.stop_training_job(TrainingJobName=self.name)
        except Exception as exc:
            raise SpectrumError(f"cannot stop job {self.name}: {exc}") from exc

    def wait(
        self,
        *,
        logs: bool = True,
        poll_s: float = 15.0,
        timeout_s: float | None = None,
        echo: Callable[[str], None] = print,
    ) -> dict[str, Any]:
        """Block until the job ends; stream its CloudWatch log lines when ``logs``.

        Raises :class:`JobFailed` (FailureReason and last log lines) when it fails or is stopped,
        :class:`JobTimeout` when ``timeout_s`` passes first.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            description = self.describe()
            if logs:
                for line in self._new_log_lines():
                    echo(line)
            status = description["TrainingJobStatus"]
            if status in TERMINAL:
                if logs:
                    for line in self._new_log_lines():
                        echo(line)
                if status != "Completed":
                    raise JobFailed(
                        self.name,
                        status,
                        description.get("FailureReason", ""),
                        self._log_tail or self._fetch_tail(),
                    )
                return description
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"job {self.name} still {status} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def _logs_client(self):
        if self._logs is None:
            self._logs = _client("logs")
        return self._logs

    def log_events(self) -> list[dict[str, Any]]:
        """CloudWatch events this handle has not returned yet (``timestamp`` in ms,
        ``message``), across the job's log streams (one per instance), each read to its end."""
        client = self._logs_client()
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

    def _new_log_lines(self) -> list[str]:
        """Lines not seen yet, across the job's log streams (one per instance)."""
        lines = [event["message"] for event in self.log_events()]
        self._log_tail = (self._log_tail + lines)[-40:]
        return lines

    def _fetch_tail(self) -> list[str]:
        self._tokens.clear()
        self._new_log_lines()
        return self._log_tail

    @property
    def outputs(self) -> dict[str, str]:
        """S3 URIs of the job's results (``model`` is a folder: outputs are uncompressed)."""
        description = self.describe()
        output = description["OutputDataConfig"]["S3OutputPath"].rstrip("/")
        uris = {
            "model": f"{output}/{self.name}/output/model/",
            "output": f"{output}/{self.name}/output/",
        }
        checkpoint = description.get("CheckpointConfig", {}).get("S3Uri")
        if checkpoint:
            uris["checkpoints"] = checkpoint
        return uris

    def _read_output(self, wanted: Callable[[str], bool], what: str) -> str:
        """The text of the one output file whose name ``wanted`` accepts."""
        model_uri = self.outputs["model"]
        bucket, key = split_s3_uri(model_uri)
        client = s3_client()
        try:
            listing = client.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
            match = [o["Key"] for o in listing if wanted(o["Key"].rsplit("/", 1)[-1])]
            if len(match) != 1:
                raise SpectrumError(f"{model_uri}: expected one {what}, found {len(match)}")
            return client.get_object(Bucket=bucket, Key=match[0])["Body"].read().decode()
        except SpectrumError:
            raise
        except Exception as exc:
            raise describe_client_error(exc, model_uri) from exc

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


def submit(request: dict[str, Any], boto_session=None) -> TrainingJob:
    """Validate, then send a CreateTrainingJob request, exactly as prepared, through the
    SageMaker SDK v3's typed resource layer (see :mod:`.sdk`)."""
    import boto3

    from .sdk import launch

    session = boto_session or boto3.Session()
    launch(request, session)
    return TrainingJob(request["TrainingJobName"], sagemaker=session.client("sagemaker"))
