"""S3 helpers: URIs, and a checkpoint source that streams shards from an ``s3://`` prefix.

boto3 picks its endpoint from the usual configuration, so ``AWS_ENDPOINT_URL`` pointing at a moto
server works for tests and local runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import SpectrumError, first_sentence
from ..core.weights import header_length, parse_header, visible_files

log = logging.getLogger(__name__)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` -> ``("bucket", "key/prefix")``; raise on anything else."""
    if not uri.startswith("s3://"):
        raise SpectrumError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise SpectrumError(f"S3 URI {uri!r} has no bucket name")
    return bucket, key


def s3_client():
    import boto3

    return boto3.client("s3")


def error_code(exc: Exception) -> str:
    """The AWS error code of a botocore ``ClientError`` (``NoSuchKey``, ``403``, ...), or ""."""
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code", "") if isinstance(response, dict) else ""


def sse_arguments(kms_key: str) -> dict[str, str]:
    """S3 upload arguments for SSE-KMS with ``kms_key`` (none without a key)."""
    return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key} if kms_key else {}


def staged_marker(uri: str) -> str:
    """The object written after everything under the prefix ``uri``: its presence means the
    prefix is complete (a half-copied prefix is never taken for a model)."""
    return uri.rstrip("/") + ".staged.json"


def describe_client_error(exc: Exception, what: str) -> SpectrumError:
    """One line for any boto3/botocore failure (missing object, credentials, endpoint)."""
    code = error_code(exc)
    if code in {"404", "NoSuchKey", "NotFound"}:
        return SpectrumError(f"{what}: no such S3 object")
    if code == "NoSuchBucket" or "NoSuchBucket" in str(exc):
        return SpectrumError(f"{what}: the bucket does not exist")
    if code in {"403", "AccessDenied"}:
        return SpectrumError(f"{what}: access denied")
    name = type(exc).__name__
    if name == "NoCredentialsError":
        return SpectrumError(f"{what}: no AWS credentials found")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return SpectrumError(
            f"{what}: cannot reach the S3 endpoint ({first_sentence(exc)}); check "
            "AWS_ENDPOINT_URL and the network"
        )
    return SpectrumError(f"{what}: {name}: {exc}")


@contextlib.contextmanager
def s3_errors(what: str):
    """Any boto3/botocore failure inside, as :func:`describe_client_error`'s one line about
    ``what`` (our own SpectrumErrors pass through)."""
    try:
        yield
    except SpectrumError:
        raise
    except Exception as exc:
        raise describe_client_error(exc, what) from exc


@dataclass
class S3Source:
    """A checkpoint under an S3 prefix. Shards are downloaded one ahead and deleted after use."""

    uri: str
    name: str = ""
    _sizes: dict[str, int] = field(default_factory=dict)
    _etags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bucket, key = split_s3_uri(self.uri)
        self.prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        self.location = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.name = self.name or (self.prefix.rstrip("/").rsplit("/", 1)[-1] or self.bucket)
        self._client = s3_client()
        self._tmp = Path(tempfile.mkdtemp(prefix="spectrum-s3-"))
        self._fetched: dict[str, Path] = {}

    def list_files(self) -> list[str]:
        if not self._sizes:
            with s3_errors(self.location):
                pages = self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
                )
                folders: list[str] = []
                for page in pages:
                    folders += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
                    for obj in page.get("Contents", []):
                        rel = obj["Key"][len(self.prefix) :]
                        if rel:
                            self._sizes[rel] = obj["Size"]
                            self._etags[rel] = obj.get("ETag", "").strip('"')
            if not self._sizes and folders:  # a model's files are read at this level only
                shown = ", ".join(f[len(self.prefix) :] for f in folders[:5])
                raise SpectrumError(
                    f"{self.location}: no files directly under this S3 prefix, only folders "
                    f"({shown}{', ...' if len(folders) > 5 else ''}): give the one that holds "
                    "the model's files"
                )
            if not self._sizes:
                raise SpectrumError(f"{self.location}: no files under this S3 prefix")
        return sorted(self._sizes)

    def read_header(self, filename: str) -> dict[str, Any]:
        """Validate a shard's header with two ranged GETs, before downloading it."""
        label = f"{self.location}/{filename}"
        size = self._sizes[filename]
        prefix = self._range(filename, 0, 7) if size >= 8 else b""
        header_len = header_length(prefix, size, label)
        raw = self._range(filename, 8, 8 + header_len - 1)
        return parse_header(raw, header_len, size, label)

    def _range(self, filename: str, first: int, last: int) -> bytes:
        with s3_errors(f"{self.location}/{filename}"):
            response = self._client.get_object(
                Bucket=self.bucket, Key=self.prefix + filename, Range=f"bytes={first}-{last}"
            )
            return response["Body"].read()

    def fetch(self, filename: str) -> Path:
        if filename in self._fetched:
            return self._fetched[filename]
        target = self._tmp / filename
        with s3_errors(f"{self.location}/{filename}"):
            self._client.download_file(self.bucket, self.prefix + filename, str(target))
        self._fetched[filename] = target
        return target

    def release(self, filename: str) -> None:
        path = self._fetched.pop(filename, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": "s3",
            "uri": self.location,
            "files": [
                {"name": n, "size": self._sizes[n], "etag": self._etags.get(n, "")}
                for n in sorted(self._sizes)
                if n.endswith((".safetensors", ".bin", ".json"))
            ],
        }


def read_object(uri: str) -> bytes:
    """The bytes of one S3 object."""
    bucket, key = split_s3_uri(uri)
    with s3_errors(uri):
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def model_config(model: str) -> dict[str, Any]:
    """``config.json`` of an ``s3://`` prefix, a local folder or file, or a Hub id."""
    if not model.startswith("s3://"):
        from ..training.memory import load_config

        return load_config(model)
    uri = model.rstrip("/") + "/config.json"
    try:
        return json.loads(read_object(uri))
    except ValueError as exc:
        raise SpectrumError(f"{uri}: unreadable config.json ({exc})") from exc


def download_prefix(uri: str, target: Path) -> int:
    """Copy every object under an S3 prefix (or one object) into ``target``; returns the count."""
    bucket, key = split_s3_uri(uri)
    client = s3_client()
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    with s3_errors(uri):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        names = (obj["Key"] for page in pages for obj in page.get("Contents", []))
        for name in (n for n in names if not n.endswith("/")):
            dest = target / (name[len(key) :].lstrip("/") or Path(name).name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, name, str(dest))
            count += 1
    if count == 0:
        raise SpectrumError(f"{uri}: no such S3 object or prefix")
    return count


def upload_folder(folder: Path, uri: str, *, extra_args: dict[str, str] | None = None) -> None:
    """Upload a file, or every visible file below a folder, under the S3 prefix ``uri``;
    ``extra_args`` go with each object (e.g. SSE-KMS)."""
    bucket, key = split_s3_uri(uri)
    key = key.rstrip("/") + "/" if key else ""
    client = s3_client()
    with s3_errors(uri):
        for rel, path in visible_files(folder):
            client.upload_file(str(path), bucket, key + rel, ExtraArgs=extra_args or None)
