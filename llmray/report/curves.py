"""The report's training curves: which metric keys each stage plots, read from its metrics JSONL files."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase as fnmatch
from pathlib import Path

from llmray.report.metrics import read_metrics, series
from llmray.report.plots import Series, plot_series


@dataclass(frozen=True)
class CurveSpec:
    """One plot of a stage, saved as `<stage>_<name>.png`: the metric keys matching `left` (fnmatch
    patterns, at most 4 keys) on the left y axis and those matching `right` on a second one labelled
    `right_label` when their range is not the left one's. Per-step keys are smoothed lines; `eval/*`
    keys are evaluation markers. A plot with no per-step line is not drawn."""

    name: str
    title: str
    ylabel: str
    left: tuple[str, ...]
    right: tuple[str, ...] = ()
    right_label: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    """Legend names of metric keys; others show the key ("(held-out eval)" added to `eval/*` keys)."""


LOSS = ("train/*loss*", "eval/*loss*")
LOSS_LABELS = (("train/loss", "training loss"), ("eval/loss", "held-out loss"),
               ("train/lm_loss", "LM loss on the mixed-in pretraining text"))
CURVES: dict[str, tuple[CurveSpec, ...]] = {
    "pretrain": (CurveSpec("loss", "pretraining loss", "cross-entropy (nats/token)", LOSS, labels=LOSS_LABELS),),
    "sft": (CurveSpec("loss", "SFT loss", "cross-entropy (nats/token)", LOSS, labels=LOSS_LABELS),),
    "reward-model": (CurveSpec("loss", "reward model loss", "pairwise loss (nats)", LOSS, labels=LOSS_LABELS),
                     CurveSpec("accuracy", "reward model pair accuracy", "share of pairs ranked right",
                               ("train/accuracy", "eval/accuracy"),
                               labels=(("train/accuracy", "training pairs"), ("eval/accuracy", "held-out pairs")))),
    "ppo": (CurveSpec("reward", "RL reward and accuracy", "reward (mean per rollout)",
                      ("rollout/reward_mean", "reward/*"), right=("rollout/accuracy", "eval/accuracy"),
                      right_label="accuracy",
                      labels=(("rollout/reward_mean", "reward, training rollouts"),
                              ("rollout/accuracy", "accuracy, training rollouts"),
                              ("eval/accuracy", "accuracy, held-out prompts (greedy)"))),
            CurveSpec("kl", "RL KL to the reference policy", "KL (nats per sequence)", ("kl/seq_mean",),
                      labels=(("kl/seq_mean", "KL(policy || ref), mean per sequence"),)),
            CurveSpec("critic", "RL critic loss", "value loss", ("critic/*loss*",))),
}


def _metric_files(stage_dir: Path) -> list[Path]:
    if not stage_dir.exists():
        return []
    return sorted(p for p in stage_dir.rglob("*.jsonl") if "metric" in p.name and p.stat().st_size)


def _keys(rows: list[dict], patterns: tuple[str, ...]) -> list[str]:
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return [k for pat in patterns for k in keys if fnmatch(k, pat)][:4]


def _in_unit_range(pts: list[tuple[float, float]]) -> bool:
    return all(-0.05 <= y <= 1.05 for _, y in pts)


def stage_series(rows: list[dict], spec: CurveSpec, eval_points: list[tuple[float, float]] | None = None
                 ) -> tuple[list[Series], bool]:
    """The series of one plot and whether a second axis is used. `eval_points` (the RL stage's
    results["eval_accuracy"]) replace an `eval/accuracy` series read from the rows."""
    left_keys, right_keys = _keys(rows, spec.left), _keys(rows, spec.right)
    found = {k: series(rows, k) for k in dict.fromkeys(left_keys + right_keys)}
    if eval_points:
        found["eval/accuracy"] = [(float(s), float(a)) for s, a in eval_points]
    found = {k: v for k, v in found.items() if len(v) > 1 or (k.startswith("eval/") and v)}
    on_right = {k for k in found if k not in left_keys and any(fnmatch(k, p) for p in spec.right)}
    left = [v for k, v in found.items() if k not in on_right]
    twin = bool(on_right and left) and not (all(_in_unit_range(v) for v in left))
    out = []
    for k, pts in found.items():
        kind = "points" if k.startswith("eval/") else "line"
        axis = "right" if twin and k in on_right else "left"
        label = dict(spec.labels).get(k) or (f"{k} (held-out eval)" if kind == "points" else k)
        label += ", right axis" if axis == "right" else ""
        out.append(Series(label, pts, kind, axis))
    out.sort(key=lambda s: (s.kind == "points", s.axis == "right"))
    return out, twin


def plot_stage(stage: str, dirs: list[Path], out_dir: Path, results: dict | None = None) -> list[Path]:
    """The PNGs of `stage`'s curves (CURVES) from the first of `dirs` with metric files."""
    rows: list[dict] = []
    for d in dirs:
        rows = [r for f in _metric_files(d) for r in read_metrics(f)]
        if rows:
            break
    if not rows:
        return []
    pngs = []
    evals = (results or {}).get("eval_accuracy") if stage == "ppo" else None
    algo = (results or {}).get("algorithm")
    for spec in CURVES.get(stage, ()):
        ser, twin = stage_series(rows, spec, evals if spec.right else None)
        if not any(s.kind == "line" for s in ser):
            continue
        title = spec.title.replace("RL", f"RL ({algo})", 1) if isinstance(algo, str) else spec.title
        ylabel = spec.ylabel if twin or not spec.right else f"{spec.ylabel} / {spec.right_label}"
        pngs.append(plot_series(ser, out_dir / f"{stage}_{spec.name}.png", title, ylabel=ylabel,
                                right_ylabel=spec.right_label if twin else ""))
    return pngs
