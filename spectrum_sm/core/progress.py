"""Progress: a bar with ETA on a terminal, plain log lines otherwise. Never a prompt."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("spectrum_sm")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Tracks work in arbitrary cost units (the scan uses estimated flops)."""

    def __init__(self, total: float, items: int, desc: str, enabled: bool = True) -> None:
        self.total = max(total, 1e-9)
        self.items = items
        self.done = 0.0
        self.count = 0
        self.start = time.monotonic()
        self._last_log = self.start
        self._bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=items, desc=desc, unit="tensor", dynamic_ncols=True)

    def eta(self) -> float:
        elapsed = time.monotonic() - self.start
        return elapsed * (self.total - self.done) / self.done if self.done else float("nan")

    def update(self, cost: float, label: str) -> None:
        self.done += cost
        self.count += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(f"{label} eta {_duration(self.eta())}", refresh=False)
            self._bar.update(1)
            return
        now = time.monotonic()
        if now - self._last_log >= 10 or self.count == self.items:
            self._last_log = now
            log.info(
                "scanned %d/%d tensors (%.0f%%), elapsed %s, eta %s",
                self.count,
                self.items,
                100 * self.done / self.total,
                _duration(now - self.start),
                _duration(self.eta()) if self.done else "?",
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
