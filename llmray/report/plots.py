"""PNG line plots of metric curves (loss, reward, KL) with matplotlib's headless backend."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_curves(
    curves: dict[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
    logy: bool = False,
) -> Path:
    """One line per named curve of (x, y) points, saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, linewidth=1.5)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
