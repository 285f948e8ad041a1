"""The analysis job's entrypoint: the Spectrum scan inside a SageMaker training job (or locally).

SageMaker runs it as ``python analyze.py --top_percent 30 ...``; every option also has a default
from the container contract:

* the model comes from ``--model_name_or_path`` (a Hub id: a token, if needed, is ``HF_TOKEN``,
  which launch.py reads from Secrets Manager when the config names it in secret_environment)
  or else from the ``model`` channel (``SM_CHANNEL_MODEL``);
* ``--stage_model_s3``: after the scan, the Hub checkpoint is copied there for the training job;
* results go to ``--output_dir``, default ``SM_MODEL_DIR`` (``/opt/ml/model`` in a job,
  ``model_snr_results`` by hand), which the job
  uploads to S3 uncompressed.

On failure the reason goes to ``/opt/ml/output/failure`` (when that folder exists) so SageMaker
shows it as the job's FailureReason. Its scan options are the fields of
:class:`spectrum_sm.core.options.ScanOptions` (the parser is generated from them); it runs over
``spectrum_sm.api`` and ``spectrum_sm.aws.s3`` (the staged copy), never the SageMaker SDK.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from argparse import Namespace
from pathlib import Path

# Shipped next to the spectrum_sm package in the job's code folder.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spectrum_sm.core.container import in_container, write_failure
from spectrum_sm.core.errors import SpectrumError
from spectrum_sm.core.options import JobParser, ScanOptions, add_arguments, given, scan_fields

log = logging.getLogger("spectrum_sm.analyze")


def parse_args(argv: list[str] | None = None) -> Namespace:
    parser = JobParser(description="Spectrum SNR scan (analysis job)", allow_abbrev=False)
    parser.add_argument(
        "--model_name_or_path",
        default=os.environ.get("SM_CHANNEL_MODEL"),
        help="Hub id or folder (default: the 'model' channel)",
    )
    parser.add_argument("--model_name", default="", help="name for the result files")
    parser.add_argument("--revision", default=None)
    add_arguments(parser, scan_fields(), flags=False)
    parser.add_argument(
        "--layer_percents",
        type=lambda text: [float(p) for p in text.split(",") if p.strip()],
        default=[],
        help="more layer files from the same scan, one folder each (percent-<P>/), certified",
    )
    parser.add_argument("--reuse_key", default="", help="the client's reuse key (the manifest)")
    parser.add_argument(
        "--stage_model_s3", default="", help="copy a Hub checkpoint here for the training job"
    )
    parser.add_argument("--stage_kms_key", default="", help="SSE-KMS key for the staged copy")
    # /opt/ml/model only inside a job: a hand run must not create /opt/ml on a workstation.
    local = "/opt/ml/model" if in_container() else "model_snr_results"
    parser.add_argument("--output_dir", default=os.environ.get("SM_MODEL_DIR") or local)
    args = parser.parse_args(argv)
    args.scan = ScanOptions(**given(args, scan_fields()))
    if not args.model_name_or_path:
        parser.error("no model: pass --model_name_or_path or provide a 'model' channel")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from spectrum_sm.api import scan, select
    from spectrum_sm.core.atomic import write_files_atomically
    from spectrum_sm.core.selection import layer_folder

    try:
        args = parse_args(argv)
        options = args.scan
        options.certify_percents = [*options.certify_percents, *args.layer_percents]
        result = scan(
            args.model_name_or_path,
            output_dir=args.output_dir,
            name=args.model_name,
            revision=args.revision,
            **{f.name: getattr(options, f.name) for f in scan_fields()},
        )
        # <output>/percent-<P>/: the layer file for P, selected from this scan's results
        # (certified at P) exactly as ``spectrum-sm select`` would
        results = Path(result.files["results"])
        for percent in map(float, args.layer_percents):
            select(
                results,
                percent,
                output_dir=results.parent / layer_folder(percent),
                include=options.include,
                exclude=options.exclude,
                embeddings=options.embeddings,
            )
    except SpectrumError as exc:
        return fail(str(exc))
    except Exception as exc:  # anything else still becomes the job's FailureReason
        traceback.print_exc()
        return fail(f"{type(exc).__name__}: {exc}")
    if args.reuse_key:  # the manifest names the key (model, settings, scanner) it is reused by
        manifest = result.files["manifest"]
        data = {**json.loads(manifest.read_text()), "reuse_key": args.reuse_key}
        write_files_atomically(manifest.parent, {manifest.name: json.dumps(data, indent=2) + "\n"})
    if args.stage_model_s3:
        try:
            stage_hub_model(
                args.model_name_or_path, args.revision, args.stage_model_s3, args.stage_kms_key
            )
        except SpectrumError as exc:
            return fail(str(exc))
    print(json.dumps({k: str(v) for k, v in result.files.items()}))
    return 0


#: What a training job needs from a Hub repository besides the weights the scan already cached.
CHECKPOINT_FILES = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def stage_hub_model(model: str, revision: str | None, uri: str, kms_key: str = "") -> None:
    """Copy the Hub checkpoint (its shards are in the cache: the scan read them) to ``uri``, then
    write ``<uri>.staged.json`` last, so a half-copied prefix is never taken for a model."""
    from huggingface_hub import snapshot_download

    from spectrum_sm.aws import s3

    try:
        folder = Path(snapshot_download(model, revision=revision, allow_patterns=CHECKPOINT_FILES))
    except Exception as exc:
        raise SpectrumError(f"cannot fetch {model} to stage it in S3: {exc}") from exc
    log.info("staging %s for training at %s", model, uri)
    extra = s3.sse_arguments(kms_key)
    s3.upload_folder(folder, uri, extra_args=extra)
    marker = s3.staged_marker(uri)
    bucket, key = s3.split_s3_uri(marker)
    body = json.dumps({"model": model, "revision": revision, "commit": folder.name})
    with s3.s3_errors(marker):
        s3.s3_client().put_object(Bucket=bucket, Key=key, Body=body.encode(), **extra)


def fail(reason: str) -> int:
    log.error("%s", reason)
    write_failure(reason)
    return 1


if __name__ == "__main__":
    sys.exit(main())
