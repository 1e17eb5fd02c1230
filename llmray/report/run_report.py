"""The pipeline's run report: report.md and report.html (the same blocks) with a summary figure first, the
held-out scores, the served answers, lm-eval results, the stage table and each stage's curves."""

from __future__ import annotations

import json
from pathlib import Path

from llmray.report import sections
from llmray.report.curves import CURVES, plot_stage
from llmray.report.doc import Block, Heading, Image, Para, to_html, to_markdown
from llmray.report.summary import plot_summary, summary_rows

RUN_KEY = "run"
"""The results entry for the whole invocation (peak memory, stage times), not a stage."""
SUMMARY_PNG = "summary.png"
TITLE = "llmray run report"


def _sampled_k(results: dict) -> int | None:
    """The k of the sampled accuracy (mean@k) when the stages record one and agree on it."""
    ks = {r["sampled_k"] for r in results.values() if isinstance(r, dict) and type(r.get("sampled_k")) is int}
    return ks.pop() if len(ks) == 1 else None


def build(paths, results: dict, out: Path) -> list[Block]:
    """The report's blocks; writes its PNGs into `out`."""
    run = results.get(RUN_KEY, {})
    stages = {k: v for k, v in results.items() if k != RUN_KEY}
    blocks: list[Block] = [Heading(TITLE, 1), Para(f"Work directory: `{paths.root}`")]
    if run.get("stage_seconds"):
        blocks.append(Para(f"Stages run this time: {sum(run['stage_seconds'].values()):.0f} s. "
                           f"Peak memory in use on the machine: {run['peak_memory_gib']} GiB "
                           f"({run['start_memory_gib']} GiB at the start)."))
    rows = summary_rows(results)
    if rows:
        png = plot_summary(rows, out / SUMMARY_PNG, _sampled_k(results))
        blocks += [Heading("Summary: the model after each stage"),
                   Image(png, "held-out perplexity and task accuracy after each stage")]
        blocks += sections.heldout_section(results)
    blocks += sections.warnings_section(stages)
    blocks += sections.quantize_section(results)
    blocks += sections.serve_section(results)
    blocks += sections.lm_eval_section(stages)
    blocks += sections.stage_table(stages, run.get("stage_seconds") or {})
    blocks += sections.dropped_section(results)
    pngs: list[Path] = []
    for stage in CURVES:
        dirs = [Path(paths.run_dir(stage)), Path(paths.of(stage))]
        pngs += plot_stage(stage, dirs, out, stages.get(stage))
    if pngs:
        blocks += [Heading("Training curves"),
                   Para("Per-step values faint; bold, their centered moving average over about a tenth of the "
                        "steps; markers, evaluations on held-out data.")]
        blocks += [Image(p, p.stem.replace("_", " "), half=True) for p in pngs]
    return blocks


def write_report(paths, results: dict) -> Path:
    """Write `<workdir>/report/report.md`, `report.html` (PNGs embedded) and the PNGs; returns the markdown path."""
    out = Path(paths.report)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # a plot this run does not draw must not linger from an earlier report
        old.unlink()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    blocks = build(paths, results, out)
    (out / "report.md").write_text(to_markdown(blocks))
    (out / "report.html").write_text(to_html(blocks, TITLE))
    return out / "report.md"
