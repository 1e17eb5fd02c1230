"""Step metrics: one JSON object per line (and TensorBoard scalars when asked), read back for plots."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends `{"step": n, "time": t, **metrics}` lines to a JSONL file; optional TensorBoard."""

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a")
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self._f.write(json.dumps(row, default=float) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) pairs of `key` from metric rows that have it."""
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]



def smoothing_half_width(n: int) -> int:
    """The half width of the smoothing window for a curve of `n` points: a window of about n/10 points
    (2h+1, h from 0 to 25), so 96 steps average over 11, 30 over 5, and under 10 steps are left as they are."""
    return min(max(round(n / 20), 0), 25)


def rolling_mean(values: list[float], half_width: int) -> list[float]:
    """Centered moving average: point i is the mean of values[i-h : i+h+1] with h = min(half_width, i,
    n-1-i), the window shrinking symmetrically at the ends. No lag behind a trend (a straight line comes
    back unchanged) and no pull towards the interior at the ends; the first and last points are the raw ones."""
    if half_width < 0:
        raise ValueError(f"rolling_mean half_width must be >= 0, got {half_width}")
    n, out = len(values), []
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    for i in range(n):
        h = min(half_width, i, n - 1 - i)
        out.append((prefix[i + h + 1] - prefix[i - h]) / (2 * h + 1))
    return out
