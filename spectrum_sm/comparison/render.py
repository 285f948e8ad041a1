"""What a comparison shows: the table (text, markdown, CSV), the figure and the files."""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..aws.s3 import sse_arguments, upload_folder
from ..core.errors import SpectrumError
from ..prices import PriceTable, job_cost
from .methods import Method, Run

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    """Every run of a comparison and where its table and figure were written."""

    runs: list[Run]
    prices: PriceTable
    output_dir: Path | None = None
    analysis: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    s3_uri: str = ""  # the copy of the files next to the jobs' outputs

    @property
    def figure(self) -> Path | None:
        return self.files.get("figure")

    def rows(self) -> list[dict[str, Any]]:
        return [run.row() for run in self.runs]

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints as its last line."""
        return {
            "runs": self.rows(),
            "table": str(self.files.get("markdown", "")),
            "csv": str(self.files.get("csv", "")),
            "figure": str(self.files.get("figure", "")),
            "s3": self.s3_uri,
            "analysis": {k: v for k, v in self.analysis.items() if k != "request"},
            "prices": self.prices.describe(),
        }

    def table(self, fmt: str = "text") -> str:
        """The comparison as ``text`` (terminal), ``markdown`` or ``csv``."""
        return render_table(self.rows(), fmt, self.prices)

    @property
    def failed(self) -> list[Run]:
        return [run for run in self.runs if run.status == "failed"]


COLUMNS = [
    ("method", "method"),
    ("trainable", "trainable params"),
    ("eval", "final eval loss"),
    ("lr", "lr"),
    ("instance", "instance"),
    ("train_s", "train s"),
    ("job_s", "job s"),
    ("billable_s", "billable s"),
    ("memory", "peak memory GiB"),
    ("tokens", "tokens/s"),
    ("cost", "cost USD"),
    ("status", "status"),
]


def _cells(row: dict[str, Any]) -> dict[str, str]:
    def number(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    trainable, total = row["trainable_params"], row.get("all_params")
    share = f" ({100 * trainable / total:.1f}%)" if trainable is not None and total else ""
    memory = row["peak_memory_bytes"]
    return {
        "method": Method(row["method"], row["top_percent"]).label,
        "trainable": "-" if trainable is None else f"{trainable:,}{share}",
        "eval": number(row.get("final_eval_loss"), ".4f"),
        "lr": number(row.get("learning_rate"), ".0e"),
        "instance": (row.get("instance_type") or "-").removeprefix("ml.")
        + (f" x{row['instance_count']}" if (row.get("instance_count") or 1) > 1 else ""),
        "train_s": number(row["train_seconds"], ".1f"),
        "job_s": number(row["job_seconds"], ".1f"),
        "billable_s": number(row["billable_seconds"], ".0f"),
        "memory": "-" if memory is None else f"{memory / 1024**3:.2f}",
        "tokens": number(row["tokens_per_sec"], ",.0f"),
        "cost": number(row["cost_usd"], ".4f"),
        "status": row["status"],
    }


def render_table(rows: list[dict[str, Any]], fmt: str, prices: PriceTable) -> str:
    """``text``: aligned columns; ``markdown``: a pipe table; ``csv``: one row per run with the
    raw numbers."""
    if fmt == "csv":
        buffer = io.StringIO()
        names = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    cells = [_cells(row) for row in rows]
    grid = [[head for _, head in COLUMNS], *([c[k] for k, _ in COLUMNS] for c in cells)]
    notes = [
        f"{c['method']} {row['status']}: {row['reason']}"
        for c, row in zip(cells, rows, strict=True)
        if row.get("reason")
    ]
    same: dict[int, list[str]] = {}
    for c, row in zip(cells, rows, strict=True):
        if row["method"] == "spectrum" and row["trainable_params"] is not None:
            same.setdefault(row["trainable_params"], []).append(c["method"])
    notes += [
        f"{' and '.join(labels)} trained the same {count:,} parameters: each type keeps "
        "int(layers x percent / 100) layers, the same number at these percents"
        for count, labels in same.items()
        if len(labels) > 1
    ]
    bases = dict.fromkeys(r["cost_basis"] for r in rows if r["cost_usd"] is not None)
    notes.append(f"cost: {'; '.join(bases) or 'n/a'}; prices as of {prices.as_of}, {prices.source}")
    if fmt == "markdown":
        lines = ["| " + " | ".join(line) + " |" for line in grid]
        lines.insert(1, "|" + "---|" * len(COLUMNS))
        return "\n".join([*lines, "", *(f"- {n}" for n in notes)]) + "\n"
    if fmt != "text":
        raise SpectrumError(f"table format must be text, markdown or csv, got {fmt!r}")
    widths = [max(map(len, column)) for column in zip(*grid, strict=True)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in grid]
    return "\n".join(line.rstrip() for line in [*lines, *notes]) + "\n"


def _cost_curve(run: Run, seconds: list[float], prices: PriceTable) -> list[float] | None:
    """What the run had cost at each of ``seconds`` since it started, by :func:`job_cost` as
    its row's cost (a billed run's billable share of its time, spot savings, throughout);
    None when the table has no price for its instance."""
    if prices.hourly(run.region, run.instance_type) is None:
        return None
    share = 1.0
    if run.billed and run.billable_seconds and run.job_seconds:
        share = run.billable_seconds / run.job_seconds
    args = (prices, run.region, run.instance_type, run.instance_count)
    return [job_cost(*args, s * share, billed=run.billed)[0] or 0.0 for s in seconds]


def plot(result: Comparison, path: Path) -> Path:
    """One PNG: validation loss against time and against cost, and peak memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [run for run in result.runs if run.status == "completed"]
    figure, (by_time, by_cost, memory) = plt.subplots(1, 3, figsize=(16, 4.8))
    for run in done:
        label = run.method.label
        points = run.curves.get("eval") or []
        seconds, losses = [p[0] for p in points], [p[2] for p in points]
        line = by_time.plot(seconds, losses, marker="o", label=label)[0]
        dollars = _cost_curve(run, seconds, result.prices)
        if dollars is not None:
            by_cost.plot(dollars, losses, marker="o", color=line.get_color(), label=label)
    by_time.set(xlabel="seconds since the job started", ylabel="validation loss")
    by_time.set_title("validation loss vs time")
    estimate = any(not run.billed for run in done)
    by_cost.set(xlabel="USD" + (" (estimate)" if estimate else ""), ylabel="validation loss")
    by_cost.set_title("validation loss vs cost")
    labels = [run.method.label for run in done]
    gib = [(run.report.get("peak_memory_bytes") or 0) / 1024**3 for run in done]
    memory.bar(labels, gib, color=[f"C{i}" for i in range(len(done))])
    memory.set(ylabel="GiB", title="peak memory (accelerator, else process RSS)")
    memory.tick_params(axis="x", rotation=30)
    for axis in (by_time, by_cost):
        if done:
            axis.legend()
        axis.grid(alpha=0.3)
    skipped = [f"{r.method.label}: {r.status}" for r in result.runs if r.status != "completed"]
    if skipped:
        figure.text(0.01, 0.01, "not shown: " + "; ".join(skipped), fontsize=8)
    figure.tight_layout(rect=(0, 0.04 if skipped else 0, 1, 1))
    figure.savefig(path, dpi=110)  # into write_outputs' folder, which exists
    plt.close(figure)
    return path


def write_outputs(result: Comparison, output_dir: Path) -> None:
    """``comparison.{json,md,csv,png}`` in ``output_dir`` (each written whole, then renamed)."""
    from ..core.atomic import write_files_atomically

    output_dir.mkdir(parents=True, exist_ok=True)
    result.output_dir = output_dir.resolve()
    names = {"json": "comparison.json", "markdown": "comparison.md", "csv": "comparison.csv"}
    result.files = {k: result.output_dir / v for k, v in names.items()}
    result.files["figure"] = plot(result, result.output_dir / "comparison.png")
    details = {
        **result.summary(),
        "curves": {run.method.label: run.curves for run in result.runs},
        "curve_sources": {run.method.label: run.curve_source for run in result.runs},
    }
    write_files_atomically(
        result.output_dir,
        {
            names["json"]: json.dumps(details, indent=2, default=str) + "\n",
            names["markdown"]: result.table("markdown"),
            names["csv"]: result.table("csv"),
        },
    )


def _upload_outputs(result: Comparison, uri: str, kms_key: str) -> None:
    """A copy next to the jobs' outputs, so a notebook finds it later."""
    try:
        upload_folder(result.output_dir, uri, extra_args=sse_arguments(kms_key))  # type: ignore[arg-type]
    except SpectrumError as exc:
        log.warning("comparison not copied to %s: %s", uri, exc)
        return
    result.s3_uri = uri
