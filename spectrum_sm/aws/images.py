"""Training images, looked up offline with the SageMaker Python SDK's ``image_uris``.

GPU instances get the Hugging Face PyTorch training image (transformers, accelerate, peft). The
analysis may run on a CPU instance: there is no Hugging Face CPU training image for transformers
5, so it gets the PyTorch CPU training image, which has everything the scan needs (torch,
safetensors and huggingface_hub come with its accelerate). Training on a CPU instance needs an
explicit ``image_uri``. The SDK is imported only here, when a request is built.
"""

from __future__ import annotations

import logging

from ..core.errors import SpectrumError
from ..core.names import quiet_logger

#: The Hugging Face training image: transformers 5.3.0 on PyTorch 2.9.0, Python 3.12.
TRANSFORMERS_VERSION = "5.3.0"
PYTORCH_VERSION = "2.9.0"
PY_VERSION = "py312"
#: The PyTorch CPU training image's full tag (the SDK returns the floating "2.9-cpu-py312", which
#: moves under a job between two runs): DLC release notes, pytorch-training-2.9-cpu-sagemaker.
CPU_IMAGE_TAG = "2.9.0-cpu-py312-ubuntu22.04-sagemaker"
INSTALL_HINT = "pip install 'spectrum-sm[sagemaker]' (the SageMaker Python SDK v3)"


def default_image(region: str, instance_type: str, *, job: str) -> str:
    """The official training image for ``job`` ("analysis" or "training") on ``instance_type``."""
    try:
        from sagemaker.core import image_uris as uris
    except ImportError as exc:
        raise SpectrumError(
            f"looking up the training image needs the SageMaker Python SDK v3: {INSTALL_HINT}, "
            "or set image_uri"
        ) from exc
    where = dict(region=region, py_version=PY_VERSION, instance_type=instance_type)
    try:
        with quiet_sdk():
            return uris.retrieve(
                framework="huggingface",
                version=TRANSFORMERS_VERSION,
                base_framework_version=f"pytorch{PYTORCH_VERSION}",
                image_scope="training",
                **where,
            )
    except ValueError as gpu_only:
        if job != "analysis":
            raise SpectrumError(
                f"no Hugging Face training image for {instance_type} in {region} "
                f"({gpu_only}); use a GPU instance type or set image_uri"
            ) from gpu_only
    version = PYTORCH_VERSION.rsplit(".", 1)[0]
    try:
        with quiet_sdk():
            floating = uris.retrieve(
                framework="pytorch", version=version, image_scope="training", **where
            )
    except ValueError as exc:
        raise SpectrumError(
            f"no PyTorch training image for {instance_type} in {region} ({exc}); set image_uri"
        ) from exc
    return floating.rsplit(":", 1)[0] + ":" + CPU_IMAGE_TAG


def quiet_sdk():
    """Hide the SDK's INFO lines (every defaulted argument) for the duration of a call."""
    return quiet_logger("sagemaker", logging.WARNING)
