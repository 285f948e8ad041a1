"""The SNR report: a heatmap of scores (layer index by module type) with the selected layers
marked, a sorted table, and the trainable share. ``Report`` shows itself inline in notebooks."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.errors import SpectrumError
from .core.selection import load_results, select_layers, sorted_results

LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class Report:
    """What :func:`snr_report` computed; ``png`` holds the heatmap."""

    top_percent: float
    selection: dict[str, list[str]]
    table: dict[str, dict[str, float]]
    png: bytes
    trainable_params: int | None = None
    all_params: int | None = None
    notes: list[str] = field(default_factory=list)

    def _repr_png_(self) -> bytes:  # Jupyter displays the heatmap inline
        return self.png

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.png)
        return path

    def lines(self, top: int = 3) -> list[str]:
        """A text summary: per type, the best modules and how many are selected."""
        out = []
        if self.trainable_params is not None and self.all_params:
            share = 100 * self.trainable_params / self.all_params
            out.append(
                f"trainable params: {self.trainable_params:,} || all params: "
                f"{self.all_params:,} || trainable%: {share:.4f}"
            )
        for layer_type, modules in self.table.items():
            chosen = len(self.selection.get(layer_type, []))
            best = ", ".join(f"{m} {s:.4f}" for m, s in list(modules.items())[:top])
            out.append(f"{layer_type:28} {chosen:3}/{len(modules):<3} selected; best: {best}")
        return out + self.notes


def _sizes_from_manifest(results_path: Path) -> dict[str, int] | None:
    stem = results_path.stem.removeprefix("snr_results_")
    manifest = results_path.with_name(f"scan_manifest_{stem}.json")
    if not manifest.is_file():
        return None
    tensors = json.loads(manifest.read_text()).get("tensors", {})
    return {module: math.prod(info.get("shape", [])) for module, info in tensors.items()}


def snr_report(
    results: str | Path | dict[str, Any],
    top_percent: float,
    *,
    embeddings: bool = True,
    title: str | None = None,
) -> Report:
    """Build the report from a results JSON (path or loaded table).

    With a path, the scan manifest next to it (ours) supplies tensor sizes for the trainable
    count; a reference results file has none, and the count is left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = None if isinstance(results, dict) else Path(results)
    table = load_results(path) if path is not None else results
    selection = select_layers(table, top_percent)
    chosen = {m for modules in selection.values() for m in modules}
    indexed = {m: int(match.group(1)) for m in table if (match := LAYER.search(m + "."))}
    layered = list(dict.fromkeys(table[m]["type"] for m in indexed))
    if not layered:
        raise SpectrumError("the results hold no per-layer modules to draw")
    depth = 1 + max(indexed.values())
    grid = np.full((len(layered), depth), np.nan)
    marks = []
    for row, layer_type in enumerate(layered):
        cells = {
            indexed[m]: (m, float(table[m]["snr"]))
            for m in indexed
            if table[m]["type"] == layer_type
        }
        values = np.array([v for _, v in cells.values()])
        low, high = np.nanmin(values), np.nanmax(values)
        for col, (module, score) in cells.items():
            # Scores differ by orders of magnitude between types: scale each row to [0, 1].
            grid[row, col] = 0.5 if high == low else (score - low) / (high - low)
            if module in chosen:
                marks.append((col, row))
    width = max(6.0, 0.28 * depth + 3)
    fig, ax = plt.subplots(figsize=(width, 0.45 * max(len(layered), 1) + 1.6))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="none")
    if marks:
        xs, ys = zip(*marks, strict=True)
        ax.scatter(
            xs,
            ys,
            marker="s",
            s=40,
            facecolors="none",
            edgecolors="red",
            linewidths=1.4,
            label=f"selected (top {top_percent}% per type)",
        )
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    ax.set_yticks(range(len(layered)), layered, fontsize=8)
    step = 1 if depth <= 40 else 2
    ax.set_xticks(range(0, depth, step), [str(i) for i in range(0, depth, step)], fontsize=7)
    ax.set_xlabel("layer index")
    ax.set_title(
        title or "Spectrum SNR (colour: score scaled within each type)", fontsize=10, loc="left"
    )
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01, label="relative SNR")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)

    report = Report(top_percent, selection, sorted_results(table), buffer.getvalue())
    sizes = _sizes_from_manifest(path) if path is not None else None
    if sizes:
        names = set(chosen)
        if embeddings:
            names |= {m for m in sizes if m == "lm_head" or m.endswith("embed_tokens")}
        report.trainable_params = sum(sizes.get(m, 0) for m in names)
        report.all_params = sum(sizes.values())
        report.notes.append("parameter counts cover the scanned weights (biases excluded)")
    elif path is not None:
        report.notes.append("no scan manifest next to the results: parameter counts omitted")
    return report
