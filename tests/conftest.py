"""Shared fixtures: tiny models and a real moto server over HTTP (one per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A sharded 4-layer random Qwen3 (bf16, untied embeddings)."""
    from factories import tiny_qwen3

    return tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def moto_server():
    """A moto server in this process, reached over real HTTP on a loopback port.

    Sets ``AWS_ENDPOINT_URL`` and dummy credentials for the whole session, so boto3 clients (ours
    and those of subprocesses) talk to it. Always our own server, even when the environment
    points elsewhere: some tests change job states in moto's in-process backend.
    """
    from spectrum_sm.demo import embedded_s3

    with embedded_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(moto_server):
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def hub_answers(monkeypatch):
    """Tests that stub huggingface_hub or datasets at their seam also stand in for the Hub's
    reachability probe, since this machine cannot reach the Hub."""
    monkeypatch.setattr("spectrum_sm.core.hub.hub_unreachable", lambda: None)
