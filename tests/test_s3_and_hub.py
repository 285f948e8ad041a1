"""Scanning from an s3:// prefix (a real moto server over HTTP) and the Hub code path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from factories import run_cli

import spectrum_sm
from spectrum_sm.core.errors import SpectrumError
from spectrum_sm.core.weights import read_header

pytestmark = pytest.mark.integration


def upload_folder(folder, bucket, prefix):
    import boto3

    client = boto3.client("s3")
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def test_scan_from_s3_matches_local_scan(tiny_model, s3_bucket, tmp_path):
    uri = upload_folder(tiny_model, s3_bucket, "models/tiny-qwen3")
    local = spectrum_sm.scan(tiny_model, 30, show_progress=False)
    remote = spectrum_sm.scan(uri, 30, output_dir=tmp_path, show_progress=False)
    assert remote.model_name == "tiny-qwen3"
    assert {m: s.snr for m, s in remote.scores.items()} == {
        m: s.snr for m, s in local.scores.items()
    }
    source = remote.manifest()["model"]["source"]
    assert source["kind"] == "s3" and source["uri"] == uri
    assert all(f["etag"] for f in source["files"])
    assert remote.files["layers"].read_text() == local.layer_file_text()


def test_cli_scan_from_s3(tiny_model, s3_bucket, tmp_path):
    uri = upload_folder(tiny_model, s3_bucket, "m")
    proc = run_cli("scan", uri, "--top-percent", "50", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "snr_results_m_unfrozenparameters_50percent.yaml").exists()


def test_truncated_shard_in_s3_is_caught_before_download(tiny_model, s3_bucket, tmp_path):
    import boto3

    uri = upload_folder(tiny_model, s3_bucket, "broken")
    shard = sorted(tiny_model.glob("model-*.safetensors"))[1]
    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key=f"broken/{shard.name}", Body=shard.read_bytes()[:-64]
    )
    with pytest.raises(SpectrumError, match=f"{shard.name}.*truncated"):
        spectrum_sm.scan(uri, 30, output_dir=tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_s3_prefix_and_bucket(s3_bucket, tmp_path):
    proc = run_cli("scan", f"s3://{s3_bucket}/nothing-here", "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 1 and "no files under this S3 prefix" in proc.stderr
    assert "Traceback" not in proc.stderr
    import boto3

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="models/m/config.json", Body=b"{}")
    proc = run_cli("scan", f"s3://{s3_bucket}/models", "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 1 and "only folders (m/): give the one" in proc.stderr
    proc = run_cli("scan", "s3://no-such-bucket-xyz/m", "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 1 and "bucket does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hub_source_reads_through_huggingface_hub(monkeypatch, tiny_model, hub_answers):
    """The Hub path calls huggingface_hub for the file list and each file; stubbed at that seam
    because this machine cannot reach the Hub (the offline error is tested in test_cli_errors)."""
    import huggingface_hub

    calls = []

    info = SimpleNamespace(
        sha="0123abcd", siblings=[SimpleNamespace(rfilename=p.name) for p in tiny_model.iterdir()]
    )

    class Api:
        def model_info(self, repo_id, revision=None, files_metadata=False):
            calls.append(("info", repo_id, revision))
            return info

    def download(repo_id, filename, revision=None):
        calls.append(("download", filename, revision))
        return str(tiny_model / filename)

    def safetensors_metadata(repo_id, revision=None):
        calls.append(("metadata", repo_id, revision))
        files = {}
        for shard in tiny_model.glob("*.safetensors"):
            header = read_header(shard)
            header.pop("__metadata__", None)
            tensors = {k: SimpleNamespace(**v) for k, v in header.items()}
            files[shard.name] = SimpleNamespace(tensors=tensors)
        return SimpleNamespace(files_metadata=files)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", safetensors_metadata)
    result = spectrum_sm.scan("Org/tiny-model", 30, revision="main", show_progress=False)
    assert result.model_name == "Org/tiny-model" and result.slug == "Org-tiny-model"
    assert result.provenance == {"kind": "hub", "repo_id": "Org/tiny-model", "revision": "0123abcd"}
    assert ("info", "Org/tiny-model", "main") in calls
    assert any(c[0] == "download" and c[2] == "0123abcd" for c in calls)
    assert ("metadata", "Org/tiny-model", "0123abcd") in calls
    local = spectrum_sm.scan(tiny_model, 30, show_progress=False)
    assert {m: s.snr for m, s in result.scores.items()} == {
        m: s.snr for m, s in local.scores.items()
    }


@pytest.mark.gpu
def test_cuda_scan_matches_cpu(tiny_model):
    assert torch.cuda.is_available()
    cpu = spectrum_sm.scan(tiny_model, 30, device="cpu", show_progress=False)
    gpu = spectrum_sm.scan(tiny_model, 30, device="cuda", show_progress=False)
    assert gpu.device == "cuda"
    assert gpu.selection() == cpu.selection()
    for module, score in cpu.scores.items():
        assert gpu.scores[module].snr == pytest.approx(score.snr, rel=1e-9)
