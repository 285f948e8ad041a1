"""Sending a prepared request through the SageMaker Python SDK v3's typed resource layer.

The request built and validated in :mod:`.requests` is the one representation of a job: the dry
run prints it, local mode runs it, and here it is handed to ``sagemaker.core.resources.
TrainingJob.create`` unchanged (the SDK's own ``transform`` turns it into its typed shapes). The
container runs our ``ContainerEntrypoint`` (``entrypoints/launch.py``) directly: no driver
channel, no renamed job, no prefixes other than the printed ones.

The SDK may still fill fields from a SageMaker config file (its "intelligent defaults"). A job
that would then differ from the printed one is not sent: the hook below compares what leaves
this process with the request and names the fields, which belong in the spectrum-sm config.
"""

from __future__ import annotations

import logging
from typing import Any

from ..core.errors import SpectrumError
from .images import INSTALL_HINT, quiet_sdk
from .requests import validate_request
from .s3 import error_code

log = logging.getLogger(__name__)


def launch(request: dict[str, Any], session) -> None:
    """Send ``request`` as it is (CreateTrainingJob) with a boto3 session."""
    validate_request(request)
    try:
        from sagemaker.core.resources import TrainingJob
        from sagemaker.core.utils.utils import transform
    except ImportError as exc:
        raise SpectrumError(f"launching on SageMaker needs {INSTALL_HINT}") from exc
    name = request["TrainingJobName"]

    def exactly_as_prepared(params: dict[str, Any], **_: Any) -> None:
        changed = sorted(k for k in {*request, *params} if request.get(k) != params.get(k))
        if changed:
            raise SpectrumError(
                f"job {name} was not sent: the SageMaker SDK would change "
                f"{', '.join(changed)} (defaults from a SageMaker config file?); set them in the "
                "spectrum-sm config so that the dry run shows them"
            )

    event = "before-parameter-build.sagemaker.CreateTrainingJob"
    session.events.register(event, exactly_as_prepared)
    try:
        with quiet_sdk():
            TrainingJob.create(
                **transform(request, "CreateTrainingJobRequest"),
                session=session,
                region=session.region_name,
            )
    except SpectrumError:
        raise
    except Exception as exc:
        code = error_code(exc) or type(exc).__name__
        text = str(exc).strip()
        first = text.splitlines()[0][:300] if text else "no message"
        raise SpectrumError(f"SageMaker refused job {name}: {code}: {first}") from exc
    finally:
        session.events.unregister(event, exactly_as_prepared)
    log.info("submitted %s", name)
