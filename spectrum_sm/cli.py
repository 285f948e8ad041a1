"""The ``spectrum-sm`` command line.

Only argparse loads at start-up; each command imports what it needs, so ``--help`` is instant.
Every error a user can cause ends in one ``error: ...`` line and exit status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

from .core.errors import SpectrumError
from .core.options import add_arguments, given, scan_fields
from .core.secrets import redact
from .core.selection import DEFAULT_TOP_PERCENT
from .core.version import __version__
from .training.args import DATA_SETTINGS, METHODS, MIN_SEQ_LENGTH, TrainArgs

log = logging.getLogger("spectrum_sm")


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100], got {text}")
    return int(value) if value.is_integer() else value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _seq_length(text: str) -> int:
    value = _positive_int(text)
    if value < MIN_SEQ_LENGTH:  # train.py's own minimum, so both agree
        raise argparse.ArgumentTypeError(f"must be at least {MIN_SEQ_LENGTH} (as train.py)")
    return value


#: How a person types percents: ``--top-percent 30``, ``--certify-percents 10,50``.
PERCENT_TYPES = {
    "top_percent": _percent,
    "certify_percents": lambda text: [_percent(p) for p in text.split(",") if p.strip()],
}


def _selection_fields():
    """The scan options that ``select`` applies again to a results file."""
    return tuple(f for f in scan_fields() if f.name in ("include", "exclude", "embeddings"))


def _plan_fields():
    """The planner's options, which ``plan`` takes as flags."""
    from .plan import PlanOptions

    return dataclasses.fields(PlanOptions)


def _add_top_percent(parser: argparse.ArgumentParser, help=None, required=False) -> None:
    default = None if required else DEFAULT_TOP_PERCENT
    parser.add_argument(
        "--top-percent", type=_percent, default=default, required=required, metavar="P", help=help
    )


def _add_job_flags(parser: argparse.ArgumentParser, printed: str, every_run: bool = False) -> None:
    """The flags of every command that launches jobs."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override a config value{' for every run' if every_run else ''}, e.g. "
        "training.spot=false (repeatable)",
    )
    parser.add_argument("--dry-run", action="store_true", help=f"print {printed}; send nothing")
    parser.add_argument(
        "--local",
        action="store_true",
        help="run the job(s) on this machine through the container contract, one by one",
    )
    parser.add_argument(
        "--workdir",
        default="spectrum-sm-jobs",
        help="local mode: where job folders (laid out like /opt/ml) go",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="SageMaker: return once the (last) job is submitted"
        + ("; --collect later" if every_run else ""),
    )
    parser.add_argument(
        "--no-logs",
        action="store_true",
        help="do not stream the jobs' logs (CloudWatch, or a local job's output)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, whose messages quote the arguments: never a credential among them."""

    def error(self, message: str):
        super().error(redact(message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spectrum-sm",
        description="Spectrum fine-tuning on Amazon SageMaker: SNR scan, layer selection, jobs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = commands.add_parser(
        "scan",
        help="score every weight of a model and write the layer file",
        description="Stream a safetensors checkpoint (folder, s3:// prefix or Hub id), score "
        "each weight by Spectrum's SNR and write the reference's result files.",
    )
    scan.add_argument(
        "model", help="local folder or .safetensors file, s3://bucket/prefix, or Hub id"
    )
    add_arguments(scan, scan_fields(), flags=True, types=PERCENT_TYPES)
    scan.add_argument(
        "--output-dir",
        default="model_snr_results",
        metavar="DIR",
        help="where the files go (default: ./model_snr_results)",
    )
    scan.add_argument("--name", default="", help="model name for file names (default: from MODEL)")
    scan.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    scan.add_argument(
        "--no-hash",
        dest="hash_files",
        action="store_false",
        help="skip sha256 of local shards in the manifest",
    )
    scan.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    select = commands.add_parser(
        "select",
        help="write the layer file for another percent from a results JSON",
        description="Select layers again from snr_results_<model>.json (ours or the reference "
        "repository's model_snr_results/), without rescanning.",
    )
    select.add_argument("results", help="snr_results_<model>.json")
    _add_top_percent(select, "share of each module type to train, in (0, 100]", required=True)
    select.add_argument(
        "--output-dir",
        metavar="DIR",
        help="where the layer file goes (default: next to RESULTS)",
    )
    select.add_argument("--name", default="", help="model name for the file name")
    add_arguments(select, _selection_fields(), flags=True)

    for name, text in (
        ("analyze", "launch the analysis job (the SNR scan) described by CONFIG"),
        ("train", "launch the training job described by CONFIG"),
        ("run", "launch analysis, then training on its layer file"),
    ):
        job = commands.add_parser(name, help=text, description=text + ".")
        job.add_argument("config", help="pipeline YAML (sections: common, analysis, training)")
        _add_job_flags(job, "CreateTrainingJob request(s) as JSON")
    comparison = commands.add_parser(
        "compare",
        help="train Spectrum at several percents, LoRA, QLoRA and full on the same data; compare",
        description="One training job per method after one shared analysis, everything else "
        "equal (data, validation set, steps, batch, sequence length, seed, instance); then a "
        "table (text, markdown, CSV) and a figure of validation loss against time and cost and "
        "peak memory per method. --collect JOB... rebuilds them from finished jobs.",
    )
    comparison.add_argument(
        "config", nargs="?", help="pipeline YAML (its training section is the common recipe)"
    )
    from .comparison.methods import DEFAULT_METHODS

    others = ", ".join(m for m in METHODS if m != "spectrum")
    comparison.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        metavar="M,M",
        help="spectrum:P (any number of percents; spectrum alone: the analysis's top_percent), "
        f"{others} (default: {DEFAULT_METHODS})",
    )
    comparison.add_argument(
        "--method-set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a hyperparameter or the instance of one method only, e.g. "
        "lora.learning_rate=2e-4, qlora.instance_type=ml.g5.2xlarge (repeatable; not steps, "
        "batch, sequence length, seed, evaluation or data)",
    )
    _add_job_flags(comparison, "every request", every_run=True)
    comparison.add_argument(
        "--collect", nargs="+", metavar="JOB", help="compare these finished training jobs"
    )
    comparison.add_argument(
        "--output-dir", default=None, help="table and figure (default: ./spectrum-sm-compare/ID)"
    )
    comparison.add_argument(
        "--prices",
        metavar="FILE",
        help="USD per instance-hour (JSON/YAML) over the shipped, dated table",
    )
    comparison.add_argument("--region", default="", help="--collect: region for prices")
    comparison.add_argument("--json", action="store_true", help="end with one JSON line")
    check = commands.add_parser(
        "data-check",
        help="show which tokens of the training data carry loss, with row counts",
        description="Load DATA exactly as the training job does (same loader, template, masks "
        "and truncation) and show, per row, the text that carries loss, after the counts of "
        "rows read, kept and dropped (by reason).",
    )
    check.add_argument("data", help="file, folder, save_to_disk folder, s3:// prefix or Hub id")
    check.add_argument("--model", required=True, help="model folder or Hub id (its tokenizer)")
    check.add_argument("--rows", type=int, default=3, metavar="K", help="rows to show (default 3)")
    check.add_argument("--split", default="train", help="Hub or DatasetDict split")
    # train.py's data arguments, as flags: the same names, help and defaults.
    data_fields = tuple(f for f in dataclasses.fields(TrainArgs) if f.name in DATA_SETTINGS)
    add_arguments(check, data_fields, flags=True, types={"max_seq_length": _seq_length})
    check.add_argument("--json", action="store_true", help="print one JSON object")
    policy = commands.add_parser(
        "iam-policy",
        help="print the least-privilege IAM policies a config needs",
        description="Print, for CONFIG's buckets, prefixes, keys and secrets, the policy the "
        "jobs' role needs and the one the launching user needs (JSON).",
    )
    policy.add_argument("config", help="pipeline YAML (sections: common, analysis, training)")
    policy.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    report = commands.add_parser(
        "report",
        help="heatmap and table of SNR scores with the selected layers marked",
        description="Draw the SNR heatmap (layer index by type, selected layers marked) from a "
        "results JSON and print the sorted table and trainable share.",
    )
    report.add_argument("results", help="snr_results_<model>.json (ours or the reference's)")
    _add_top_percent(report)
    report.add_argument("--output", default=None, help="PNG path (default: next to RESULTS)")
    report.add_argument("--no-embeddings", dest="embeddings", action="store_false")

    planner = commands.add_parser(
        "plan",
        help="count trainable parameters and estimate GPU memory from config.json",
        description="Count what spectrum (at P%), full and LoRA train and estimate per-GPU "
        "memory from a model's config.json alone; recommend instances that fit.",
    )
    planner.add_argument("model", help="folder or config.json path, or Hub id")
    _add_top_percent(planner)
    sizes = {"seq": _positive_int, "batch": _positive_int, "lora_rank": _positive_int}
    add_arguments(planner, _plan_fields(), flags=True, types=sizes)
    planner.add_argument("--json", action="store_true", help="print one JSON object")

    demo = commands.add_parser(
        "demo",
        help="run the whole pipeline here on a small model (no AWS account needed)",
        description="Build a small Qwen3 model and chat data, start an embedded S3 unless "
        "AWS_ENDPOINT_URL is set, run analysis and training in local mode, show the results.",
    )
    demo.add_argument("--workdir", default="spectrum-sm-demo", help="where everything goes")
    demo.add_argument(
        "--steps", type=_positive_int, default=30, help="training steps (default: 30)"
    )
    _add_top_percent(demo, "share of each module type to train (default: 50)")
    demo.add_argument("--json", action="store_true", help="end with one JSON line")
    return parser


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .core.atomic import ensure_output_dir
    from .report import snr_report

    output = Path(
        args.output or Path(args.results).with_suffix(f".snr_{args.top_percent}percent.png")
    )
    if output.suffix.lower() != ".png":  # never another file overwritten by a figure
        raise SpectrumError(f"--output {str(output)!r}: the heatmap is a PNG; name it *.png")
    if output.is_dir():
        raise SpectrumError(f"--output {str(output)!r} is a folder; name the PNG file")
    report = snr_report(args.results, args.top_percent, embeddings=args.embeddings)
    ensure_output_dir(output.parent)
    print("\n".join(report.lines()))
    try:
        saved = report.save(output)
    except OSError as exc:
        raise SpectrumError(f"cannot write the heatmap {str(output)!r}: {exc.strerror}") from None
    print(f"heatmap: {saved}")
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    from .plan import plan

    result = plan(args.model, args.top_percent, **given(args, _plan_fields()))
    if args.json:
        print(json.dumps(result))
        return 0
    total = result["total_params"]
    print(f"{args.model}: {total:,} parameters")
    rows = [
        ("spectrum", result["trainable_params"]),
        ("spectrum, no embeddings", result["trainable_params_no_embeddings"]),
        ("full", result["full_params"]),
        (f"lora r={result['lora_rank']}", result["lora_params"]),
    ]
    if result.get("expert_params"):  # MoE: how much of Spectrum's count is expert slices
        rows.insert(2, ("spectrum, expert slices", result["expert_trainable_params"]))
    for label, count in rows:
        print(f"  {label:24} trainable {count:>16,}  ({100 * count / total:6.2f}%)")
    memory = ", ".join(f"{m} {g}" for m, g in result["memory_one_gpu_gib"].items())
    print(f"memory on one GPU (GiB): {memory}")
    fits = ", ".join(f"{m} {i or 'none listed'}" for m, i in result["recommended"].items())
    print(f"cheapest instance that fits: {fits}")
    print(f"assumptions: {result['assumptions']}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, summary_lines

    result = run_demo(args.workdir, steps=args.steps, top_percent=args.top_percent)
    if not args.quiet:
        print("\n".join(summary_lines(result)))
    if args.json:
        print(json.dumps(result))
    return 0


def _run_scan(args: argparse.Namespace) -> int:
    from .api import scan

    result = scan(
        args.model,
        output_dir=args.output_dir,
        name=args.name,
        revision=args.revision,
        hash_files=args.hash_files,
        show_progress=not args.quiet,
        **given(args, scan_fields()),
    )
    summary = {
        "model": result.model_name,
        "weights_scanned": len(result.scores),
        "recomputed_in_float64": len(result.recomputed),
        "selected": sum(len(v) for v in result.selection().values()),
        "seconds": round(result.seconds, 2),
        "files": {k: str(p) for k, p in result.files.items()},
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"scanned {summary['weights_scanned']} weights in {summary['seconds']} s; "
            f"selected {summary['selected']} at {result.top_percent}%"
        )
        print(f"layer file: {result.files['layers']}")
    return 0


def _run_select(args: argparse.Namespace) -> int:
    from .api import select

    path = select(
        args.results,
        args.top_percent,
        output_dir=args.output_dir,
        name=args.name,
        **given(args, _selection_fields()),
    )
    print(f"layer file: {path}")
    return 0


def _run_data_check(args: argparse.Namespace) -> int:
    from .api import check_data
    from .training.data import Counts
    from .training.datacheck import render_row

    settings = {name: getattr(args, name) for name in DATA_SETTINGS}
    report = check_data(args.data, args.model, rows=args.rows, split=args.split, **settings)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "rendered"}))
    else:
        print(Counts(**{f.name: report[f.name] for f in dataclasses.fields(Counts)}).line())
        if report["loss_mask"]:
            print(f"loss mask: {report['loss_mask']}")
        color = sys.stdout.isatty()
        for example, pieces in zip(report["examples"], report["rendered"], strict=True):
            print(
                f"\n--- row {example['row']}: {example['tokens']} tokens, "
                f"{example['loss_tokens']} with loss"
                + (f" (dropped: {example['drop_reason']})" if example["drop_reason"] else "")
            )
            print(render_row(pieces, color=color))
        if not color:
            print("\n(text between [[ and ]] carries loss)")
    if report.get("error"):
        raise SpectrumError(report["error"])
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from .aws.pipeline import launcher_for
    from .comparison import collect, compare

    shared = {
        "launcher": launcher_for(args.local, args.workdir),
        "output_dir": args.output_dir,
        "prices": args.prices,
    }
    if args.collect:
        if args.config or args.dry_run or args.set or args.method_set:
            raise SpectrumError(
                "--collect takes job names only (no CONFIG, --set, --method-set or --dry-run)"
            )
        result = collect(args.collect, region=args.region, **shared)
    else:
        if not args.config:
            raise SpectrumError("compare needs CONFIG (or --collect JOB...)")
        result = compare(
            args.config,
            args.methods,
            overrides=args.set,
            method_settings=args.method_set,
            dry_run=args.dry_run,
            wait=not args.no_wait,
            logs=not args.no_logs,
            **shared,
        )
    if args.dry_run:
        requests = {
            "analysis": result.analysis["request"] if result.analysis else None,
            "runs": {r.method.label: r.request for r in result.runs if r.request},
            "skipped": {r.method.label: r.reason for r in result.runs if r.status == "skipped"},
        }
        print(json.dumps(requests, indent=2))
        return 0
    if not result.files:  # submitted, not waited for
        jobs = " ".join(r.job for r in result.runs if r.job)
        print(f"submitted; when they end: spectrum-sm compare --collect {jobs}")
    elif not args.quiet:
        print(result.table("text"))
        print(f"table: {result.files['markdown']}\nfigure: {result.files['figure']}")
    if args.json:
        print(json.dumps(result.summary()))
    if result.failed:
        raise SpectrumError(
            f"{len(result.failed)} of {len(result.runs)} runs failed: "
            + "; ".join(
                f"{r.method.label}: {(r.reason or 'failed').splitlines()[0][:200]}"
                for r in result.failed
            )
        )
    return 0


def _run_iam_policy(args: argparse.Namespace) -> int:
    from .aws.config import load_pipeline
    from .aws.iam import policies

    print(json.dumps(policies(load_pipeline(args.config, args.set)), indent=2))
    return 0


def _run_jobs(args: argparse.Namespace) -> int:
    from .aws import pipeline
    from .aws.config import load_pipeline

    config = load_pipeline(args.config, args.set)
    job = {"run": config, "analyze": config.analysis, "train": config.training}[args.command]
    result = pipeline.launch(
        job,
        dry_run=args.dry_run,
        wait=not args.no_wait,
        logs=not args.no_logs,
        reuse=config.reuse_analysis,
        launcher=pipeline.launcher_for(args.local, args.workdir),
    )
    print(json.dumps(result, indent=2 if args.dry_run else None))
    return 0


COMMANDS = {
    "demo": _run_demo,
    "plan": _run_plan,
    "report": _run_report,
    "scan": _run_scan,
    "select": _run_select,
    "iam-policy": _run_iam_policy,
    "compare": _run_compare,
    "data-check": _run_data_check,
    "analyze": _run_jobs,
    "train": _run_jobs,
    "run": _run_jobs,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``spectrum-sm COMMAND ...``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "tensorboard"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except SpectrumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
