"""The pipeline's run report: report.md and report.html with each stage's key numbers and PNG curves."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from llmray.report.metrics import read_metrics, series
from llmray.report.plots import plot_curves

# Metric keys plotted per stage, by substring, in the order they are looked for.
CURVES = {
    "pretrain": ("loss",),
    "sft": ("loss",),
    "reward-model": ("loss", "accuracy"),
    "ppo": ("reward", "kl"),
}
RUN_KEY = "run"
"""The results entry for the whole invocation (peak memory, stage times), not a stage."""
KEY_NUMBERS = ("documents", "documents_in", "documents_out", "duplicates_removed", "exact_duplicates",
               "near_duplicates", "tokens", "num_tokens", "num_sequences", "final_loss", "steps",
               "tokens_per_s", "accuracy", "eval_accuracy", "heldout_accuracy", "heldout_ppl",
               "task_accuracy", "sampled_accuracy", "task_mean_reward", "mean_reward", "perplexity_increase",
               "size_ratio", "latency_p50_s", "elapsed_s", "prompt_filter_kept", "prompt_filter_pool",
               "eval/accuracy", "restarts", "rollout_restarts", "trainer_restarts")


def _metric_files(stage_dir: Path) -> list[Path]:
    if not stage_dir.exists():
        return []
    return sorted(p for p in stage_dir.rglob("*.jsonl") if "metric" in p.name and p.stat().st_size)


def _plot_stage(stage: str, stage_dir: Path, out_dir: Path) -> list[Path]:
    pngs = []
    rows = [r for f in _metric_files(stage_dir) for r in read_metrics(f)]
    if not rows:
        return pngs
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))} - {"step", "time"})
    for want in CURVES.get(stage, ()):
        matched = [k for k in keys if want in k.lower() and "coef" not in k.lower()][:4]
        curves = {k: series(rows, k) for k in matched}
        curves = {k: v for k, v in curves.items() if len(v) > 1}
        if curves:
            pngs.append(plot_curves(curves, out_dir / f"{stage}_{want}.png", f"{stage}: {want}", ylabel=want))
    return pngs


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def _eval_plot(results: dict, out_dir: Path) -> list[Path]:
    stages = [s for s in ("pretrain", "sft", "ppo", "quantize") if "task_accuracy" in results.get(s, {})]
    if not stages:
        return []
    acc = {"task accuracy": [(i, results[s]["task_accuracy"]) for i, s in enumerate(stages)]}
    p = plot_curves(acc, out_dir / "task_accuracy.png", "task accuracy by stage (" + ", ".join(stages) + ")",
                    xlabel="stage index")
    return [p]


def write_report(paths, results: dict) -> Path:
    """Write `<workdir>/report/report.md` and `report.html`; returns the markdown path."""
    out = Path(paths.report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    md = ["# llmray run report", "", f"Work directory: `{paths.root}`", ""]
    run = results.get(RUN_KEY, {})
    stages = {k: v for k, v in results.items() if k != RUN_KEY}
    if run.get("stage_seconds"):
        md.append(f"Stages run this time: {sum(run['stage_seconds'].values()):.0f} s. "
                  f"Peak memory in use on the machine: {run['peak_memory_gib']} GiB "
                  f"({run['start_memory_gib']} GiB at the start).")
        md.append("")
    md += ["## Stages", "", "| stage | key numbers |", "|---|---|"]
    for stage, res in stages.items():
        flat = _flatten(res)
        nums = [f"{k}={v}" for k, v in flat.items() if k.split(".")[-1] in KEY_NUMBERS]
        md.append(f"| {stage} | {'; '.join(nums[:14]) or '—'} |")
    md.append("")
    evals = [(s, r) for s, r in stages.items() if "heldout_ppl" in r or "task_accuracy" in r]
    if evals:
        md += ["## Held-out perplexity and task accuracy", "",
               "Task accuracy is greedy; sampled accuracy is the mean correctness of k samples per prompt at "
               "temperature 1 (mean@k), the policy as RL samples and trains it; pass@k is the share of prompts "
               "with at least one correct sample.", "",
               "| model after | held-out ppl | task accuracy (greedy) | sampled accuracy (mean@k) "
               "| pass@k | mean reward |",
               "|---|---|---|---|---|---|"]
        for s, r in evals:
            md.append(f"| {s} | {r.get('heldout_ppl', '—')} | {r.get('task_accuracy', '—')} "
                      f"| {r.get('sampled_accuracy', '—')} "
                      f"| {r.get('sampled_pass_at_k', '—')} | {r.get('task_mean_reward', '—')} |")
        md.append("")
    warnings = [(s, w) for s, r in stages.items() for w in r.get("reward_hacking_warnings", []) or []]
    if warnings:
        md += ["## Monitor warnings", ""] + [f"- {s}: {w}" for s, w in warnings] + [""]
    dropped = _flatten(results.get("clean-dedup", {}))
    drop_rows = [(k, v) for k, v in dropped.items() if "drop" in k.lower() and isinstance(v, (int, float))]
    if drop_rows:
        md += ["## Documents dropped, by reason", "", "| reason | documents |", "|---|---|"]
        md += [f"| {k} | {v} |" for k, v in drop_rows]
        md.append("")
    pngs: list[Path] = []
    for stage in CURVES:
        pngs += _plot_stage(stage, Path(paths.run_dir(stage)), out) or _plot_stage(stage, Path(paths.of(stage)), out)
    pngs += _eval_plot(results, out)
    if pngs:
        md += ["## Curves", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    answers = results.get("serve", {}).get("answers", [])
    if answers:
        md += ["## Answers from the served model", ""]
        md += [f"- **Q:** {a['prompt']}  **A:** {a['answer']} ({'correct' if a.get('correct') else 'wrong'})"
               for a in answers]
        md.append("")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_to_html(md))
    return out / "report.md"


def _to_html(md_lines: list[str]) -> str:
    """A small markdown subset (headings, tables, images, bullets) to standalone HTML."""
    body, in_table = [], False
    for line in md_lines:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            body.append(f'<img src="{html.escape(src)}" style="max-width:640px">')
        elif line.startswith("- "):
            body.append(f"<p>{html.escape(line[2:]).replace('**', '')}</p>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:900px;margin:2em auto}td{border:1px solid #ccc;padding:4px}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>llmray run report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
