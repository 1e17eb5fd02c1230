"""PNG plots of metric curves with matplotlib's headless backend: smoothed lines over faint raw ones,
evaluation points as markers, an optional second y axis."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llmray.report.metrics import rolling_mean, smoothing_half_width

Points = Sequence[tuple[float, float]]


@dataclass(frozen=True)
class Series:
    """One thing drawn on a plot. `kind` "line": per-step values, drawn smoothed (centered moving average)
    with the raw line faint behind; "points": evaluations, drawn as markers joined by a thin dashed line.
    `axis` "left" or "right" (the second y axis, for a quantity on another scale)."""

    label: str
    points: Points
    kind: str = "line"
    axis: str = "left"


def finite(points: Points) -> list[tuple[float, float]]:
    """The points whose x and y are finite numbers, sorted by x."""
    return sorted((float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    _pyplot().close(fig)
    return out


def plot_series(series: Sequence[Series], path: str | Path, title: str, ylabel: str = "", right_ylabel: str = "",
                xlabel: str = "step", logy: bool = False) -> Path:
    """Draw `series` (empty ones skipped) and save a PNG at `path`. Lines are
    smoothed with `rolling_mean` over `smoothing_half_width(n)`; the legend sits under the axes, clear of
    the data."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    right = ax.twinx() if any(s.axis == "right" and s.points for s in series) else None
    handles, smoothed_any = [], False
    for i, s in enumerate(series):
        pts = finite(s.points)
        if not pts:
            continue
        target = right if s.axis == "right" and right is not None else ax
        color = f"C{i}"
        xs, ys = zip(*pts)
        if s.kind == "points":
            (h,) = target.plot(xs, ys, color=color, marker="o", markersize=7, linestyle="--", linewidth=0.8,
                               markeredgecolor="black", markeredgewidth=0.6, label=s.label, zorder=5)
        else:
            half = smoothing_half_width(len(ys))
            if half > 0:
                target.plot(xs, ys, color=color, alpha=0.25, linewidth=1.0)
                smoothed_any = True
            (h,) = target.plot(xs, rolling_mean(list(ys), half), color=color, linewidth=2.0, label=s.label)
        handles.append(h)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if right is not None:
        right.set_ylabel(right_ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if smoothed_any:
        handles.append(Line2D([], [], color="grey", alpha=0.35, linewidth=1.0, label="raw per-step values"))
    if len(handles) > 1:
        ncol = min(len(handles), 2 if max(len(h.get_label()) for h in handles) > 24 else 3)
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, frameon=False,
                  fontsize=9)
    return _save(fig, path)


def plot_curves(curves: dict[str, Points], path: str | Path, title: str, xlabel: str = "step", ylabel: str = "",
                logy: bool = False) -> Path:
    """One smoothed line per named curve of (x, y) points, saved as a PNG at `path`."""
    return plot_series([Series(name, pts) for name, pts in curves.items()], path, title, ylabel=ylabel,
                       xlabel=xlabel, logy=logy)
