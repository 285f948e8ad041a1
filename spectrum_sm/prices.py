"""SageMaker training prices: a shipped, dated, per-region table, and the cost of a job.

Pure data and arithmetic (no AWS calls): the planner ranks instances by it, ``compare`` prices
runs with it.

Cost follows the service's own billing: ``BillableTimeInSeconds x InstanceCount x hourly
on-demand price``. Managed spot training needs no separate rate: its savings are already in
``BillableTimeInSeconds`` (savings = 1 - billable / training time, per DescribeTrainingJob's
documentation). A local run has no billable time; its cost is an estimate (its wall time at the
configured instance's price), and says so.

Prices change: the table carries its date and source, and :func:`load_prices` takes the user's
own (``--prices FILE``) in its place or on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.errors import SpectrumError

#: On-demand SageMaker *training* prices in USD per instance-hour, read from
#: https://aws.amazon.com/sagemaker/pricing/ (tab "On-Demand Pricing", "Training") on AS_OF.
#: AWS cut P4 and P5 prices in mid-2025, after this date: pass your own with --prices.
AS_OF = "2025-05-01"
SOURCE = "https://aws.amazon.com/sagemaker/pricing/ (on-demand, training)"
_US = {
    "ml.m5.large": 0.115,
    "ml.m5.xlarge": 0.23,
    "ml.m5.2xlarge": 0.461,
    "ml.m5.4xlarge": 0.922,
    "ml.m5.12xlarge": 2.765,
    "ml.c5.xlarge": 0.204,
    "ml.c5.2xlarge": 0.408,
    "ml.g4dn.xlarge": 0.736,
    "ml.g4dn.2xlarge": 0.94,
    "ml.g4dn.12xlarge": 4.89,
    "ml.g5.xlarge": 1.408,
    "ml.g5.2xlarge": 1.515,
    "ml.g5.4xlarge": 2.03,
    "ml.g5.8xlarge": 3.06,
    "ml.g5.12xlarge": 7.09,
    "ml.g5.16xlarge": 4.10,
    "ml.g5.24xlarge": 10.18,
    "ml.g5.48xlarge": 20.36,
    "ml.g6e.2xlarge": 2.80,
    "ml.g6e.12xlarge": 13.12,
    "ml.g6e.48xlarge": 37.66,
    "ml.p4d.24xlarge": 37.69,
    "ml.p4de.24xlarge": 47.11,
    "ml.p5.48xlarge": 113.07,
    "ml.p5e.48xlarge": 120.00,
}
SHIPPED: dict[str, dict[str, float]] = {"us-east-1": dict(_US), "us-west-2": dict(_US)}


@dataclass
class PriceTable:
    """USD per instance-hour by region and instance type, with where the numbers came from."""

    regions: dict[str, dict[str, float]]
    as_of: str = AS_OF
    source: str = SOURCE
    overrides: dict[str, float] = field(default_factory=dict)  # any region

    def hourly(self, region: str, instance_type: str) -> float | None:
        return self.overrides.get(instance_type, self.regions.get(region, {}).get(instance_type))

    def describe(self) -> dict[str, Any]:
        return {"as_of": self.as_of, "source": self.source}


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The shipped table, or it with a user's file on top.

    The file (JSON or YAML) is either ``{instance_type: usd_per_hour}`` (any region) or
    ``{"as_of": ..., "source": ..., "regions": {region: {instance_type: usd_per_hour}}}``.
    """
    table = PriceTable({r: dict(p) for r, p in SHIPPED.items()})
    if path is None:
        return table
    path = Path(path)
    if not path.is_file():
        raise SpectrumError(f"price file {str(path)!r} does not exist")
    import yaml

    try:
        data = yaml.safe_load(path.read_text())  # YAML reads JSON too
    except yaml.YAMLError as exc:
        raise SpectrumError(f"{path}: not valid JSON or YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise SpectrumError(f"{path}: expected a mapping of instance types to USD per hour")
    regions = data.get("regions")
    flat = {k: v for k, v in data.items() if k not in ("as_of", "source", "regions")}
    if regions is not None and not isinstance(regions, dict):
        raise SpectrumError(f"{path}: regions must map region -> {{instance type: USD/hour}}")
    for where, prices in [("", flat), *((f"regions.{r}.", p) for r, p in (regions or {}).items())]:
        if not isinstance(prices, dict):
            raise SpectrumError(f"{path}: {where.rstrip('.')} must map instance type to USD/hour")
        for instance, price in prices.items():
            if not str(instance).startswith("ml.") or isinstance(price, bool):
                raise SpectrumError(f"{path}: {where}{instance}: expected ml.<type>: USD per hour")
            if not isinstance(price, (int, float)) or price < 0:
                raise SpectrumError(
                    f"{path}: {where}{instance}: price must be a number >= 0, got {price!r}"
                )
    for region, prices in (regions or {}).items():
        table.regions.setdefault(region, {}).update({k: float(v) for k, v in prices.items()})
    table.overrides = {k: float(v) for k, v in flat.items()}
    table.as_of = str(data.get("as_of", f"{AS_OF}, with {path.name}"))
    table.source = str(data.get("source", str(path)))
    return table


def job_cost(
    table: PriceTable,
    region: str,
    instance_type: str,
    instance_count: int,
    seconds: float | None,
    *,
    billed: bool,
) -> tuple[float | None, str]:
    """``(USD, basis)``: the cost of ``seconds`` on ``instance_count`` instances, and how it was
    reached; ``(None, why)`` when the table has no price."""
    hourly = table.hourly(region, instance_type)
    if hourly is None:
        return None, (
            f"no price for {instance_type} in {region} (table of {table.as_of}); pass --prices FILE"
        )
    if seconds is None:
        return None, "no billable time reported"
    cost = round(seconds * instance_count * hourly / 3600, 6)
    what = "billable seconds" if billed else "local wall seconds (estimate)"
    return cost, f"{what} x {instance_count} x ${hourly}/h {instance_type} {region} ({table.as_of})"
