"""The report's summary figure: held-out perplexity and task accuracy after each model-producing stage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# The stages that produce a model, in pipeline order; `serve` joins them when the endpoint was scored.
MODEL_STAGES = ("pretrain", "sft", "ppo", "quantize")
VALUES = ("heldout_ppl", "task_accuracy", "sampled_accuracy")


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def stage_label(stage: str, res: dict) -> str:
    """The stage's name, with the RL algorithm when it is not the stage's own name ("ppo (grpo)")."""
    algo = res.get("algorithm")
    return f"{stage} ({algo})" if isinstance(algo, str) and algo and algo != stage else stage


def summary_rows(results: dict) -> list[dict]:
    """One row per model-producing stage with any of held-out perplexity, greedy task accuracy and
    sampled accuracy (mean@k): {"stage", "label", "heldout_ppl", "task_accuracy", "sampled_accuracy"},
    a missing or non-numeric value as None. `serve` adds a row when results["serve"]["served_accuracy"]
    exists: the endpoint's greedy accuracy on the held-out prompts (no perplexity, no sampled accuracy)."""
    rows = []
    for stage in MODEL_STAGES:
        res = results.get(stage)
        if not isinstance(res, dict):
            continue
        row = {"stage": stage, "label": stage_label(stage, res), **{k: _number(res.get(k)) for k in VALUES}}
        if any(row[k] is not None for k in VALUES):
            rows.append(row)
    served = _number((results.get("serve") or {}).get("served_accuracy"))
    if served is not None:
        rows.append({"stage": "serve", "label": "serve", "heldout_ppl": None, "task_accuracy": served,
                     "sampled_accuracy": None})
    return rows


def _fmt_ppl(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _fmt_acc(v: float) -> str:
    return f"{v:.2f}" if round(v, 2) == v else f"{v:.3f}"


def _line(ax, rows: list[dict], key: str, fmt, offset: int, **style) -> bool:
    pts = [(i, r[key]) for i, r in enumerate(rows) if r[key] is not None]
    if not pts:
        return False
    xs, ys = zip(*pts)
    ax.plot(xs, ys, **style)
    for x, y in pts:
        ax.annotate(fmt(y), (x, y), textcoords="offset points", xytext=(0, offset), ha="center",
                    va="bottom" if offset > 0 else "top", fontsize=8, color=style.get("color"))
    return True


def plot_summary(rows: list[dict], path: str | Path, sampled_k: int | None = None) -> Path:
    """Two panels over the stages in `rows` (from `summary_rows`): held-out perplexity on a log scale,
    and task accuracy (greedy, and sampled mean@k where present) on 0..1; each point labelled."""
    from llmray.report.plots import _pyplot, _save

    plt = _pyplot()
    fig, (ppl_ax, acc_ax) = plt.subplots(1, 2, figsize=(10.4, 3.8), dpi=100)
    labels = [r["label"] for r in rows]
    has_ppl = _line(ppl_ax, rows, "heldout_ppl", _fmt_ppl, 8, color="C3", marker="o", linewidth=1.5)
    ppl_ax.set_title("held-out perplexity (lower is better)")
    ppl_ax.set_ylabel("perplexity (log scale)")
    if has_ppl:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ppl_ax.set_yscale("log")
        decades = math.log10(max(r["heldout_ppl"] for r in rows if r["heldout_ppl"] is not None)
                             / min(r["heldout_ppl"] for r in rows if r["heldout_ppl"] is not None))
        ppl_ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if decades > 1.5 else (1.0, 2.0, 5.0)))
        ppl_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_ppl(v)))
        ppl_ax.yaxis.set_minor_formatter(NullFormatter())
        lo = min(r["heldout_ppl"] for r in rows if r["heldout_ppl"] is not None)
        hi = max(r["heldout_ppl"] for r in rows if r["heldout_ppl"] is not None)
        ppl_ax.set_ylim(lo / 2.0, hi * 2.5)  # room for the labels above the points
    else:
        ppl_ax.text(0.5, 0.5, "no perplexity measured", ha="center", va="center", transform=ppl_ax.transAxes)
    mean_at = f"mean@{sampled_k}" if sampled_k else "mean@k"
    _line(acc_ax, rows, "task_accuracy", _fmt_acc, 8, color="C0", marker="o", linewidth=1.5,
          label="greedy")
    _line(acc_ax, rows, "sampled_accuracy", _fmt_acc, -9, color="C2", marker="s", linewidth=1.5,
          linestyle="--", label=f"sampled ({mean_at})")
    acc_ax.set_title("task accuracy, held-out prompts (higher is better)")
    acc_ax.set_ylabel("accuracy")
    accs = [r[k] for r in rows for k in ("task_accuracy", "sampled_accuracy") if r[k] is not None]
    # 0 to 1 when an accuracy passes 0.6; otherwise 0 to a tenth above the best, at least 0.5 (labels fit).
    acc_ax.set_ylim(-0.02, 1.0 if max(accs, default=0) > 0.6 else max(0.5, math.ceil((max(accs) + 0.1) * 10) / 10))
    if acc_ax.get_legend_handles_labels()[0]:
        acc_ax.legend(loc="upper left", fontsize=8, frameon=False)
    for ax in (ppl_ax, acc_ax):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xlabel("model after stage")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
