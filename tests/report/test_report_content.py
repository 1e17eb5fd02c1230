"""The run report from a synthetic results dict and metric logs: the summary figure first, the served answers
with ✓/✗, served against offline accuracy, lm-eval rows, the stage table, RL evaluation points; md and html
carry the same content. Pure (matplotlib, no Ray)."""

from __future__ import annotations

import json
import re

import pytest

from llmray.report.curves import CURVES, stage_series
from llmray.report.summary import summary_rows

ANSWERS = [
    {"prompt": "What is 12 + 7?", "answer": "19", "correct": True},
    {"prompt": "What is 3 * 4?", "answer": "7 | 12", "correct": False},
    {"prompt": "Reverse: abc", "answer": "cba", "correct": True},
    {"prompt": "What is 9 - 5?", "answer": "5", "correct": False},
]


def _results() -> dict:
    return {
        "pretrain": {"final_loss": 5.2, "heldout_ppl": 204.8, "task_accuracy": 0.0, "elapsed_s": 92.1},
        "sft": {"heldout_ppl": 380.5, "task_accuracy": 0.305, "sampled_accuracy": 0.19, "sampled_pass_at_k": 0.41,
                "lm_eval": {"llmray_arith": {"exact_match,none": 0.25, "exact_match_stderr,none": 0.031}}},
        "ppo": {"algorithm": "ppo", "steps": 30, "heldout_ppl": 402.0, "task_accuracy": 0.43,
                "sampled_accuracy": 0.31, "eval_accuracy": [[0, 0.305], [10, 0.36], [20, 0.40], [30, 0.43]],
                "lm_eval": {"llmray_arith": {"exact_match,none": 0.41, "exact_match_stderr,none": 0.035},
                            "llmray_heldout_ppl": {"word_perplexity,none": 512.25}}},
        "quantize": {"heldout_ppl": 403.1, "task_accuracy": 0.425, "size_ratio": 0.29},
        "serve": {"answers": ANSWERS, "served_accuracy": 0.43, "offline_accuracy": 0.425, "latency_p50_s": 0.21},
        "run": {"peak_memory_gib": 6.3, "start_memory_gib": 1.2, "stage_seconds": {"pretrain": 92.1, "ppo": 140.0}},
    }


def _write_metrics(paths) -> None:
    from pathlib import Path

    ppo = Path(paths.run_dir("ppo"))
    ppo.mkdir(parents=True)
    rows = [{"step": 0, "eval/accuracy": 0.305}]
    for s in range(1, 31):  # a reward on another scale than accuracy: the eval points go on a second axis
        rows.append({"step": s, "rollout/reward_mean": -1.0 + 0.1 * s + (0.3 if s % 2 else -0.3),
                     "rollout/accuracy": 0.3 + 0.004 * s, "kl/seq_mean": 0.01 * s, "kl_coef": 0.05})
    (ppo / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pre = Path(paths.run_dir("pretrain"))
    pre.mkdir(parents=True)
    lines = [{"step": s, "train/loss": 8.0 - 0.05 * s} for s in range(1, 51)] + [{"step": 50, "eval/loss": 5.5}]
    (pre / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_summary_rows_take_each_model_stage_and_the_endpoint():
    rows = summary_rows(_results())
    assert [r["stage"] for r in rows] == ["pretrain", "sft", "ppo", "quantize", "serve"]
    assert rows[1] == {"stage": "sft", "label": "sft", "heldout_ppl": 380.5, "task_accuracy": 0.305,
                       "sampled_accuracy": 0.19}
    assert rows[4] == {"stage": "serve", "label": "serve", "heldout_ppl": None, "task_accuracy": 0.43,
                       "sampled_accuracy": None}
    grpo = summary_rows({"ppo": {"algorithm": "grpo", "task_accuracy": 0.3, "heldout_ppl": float("nan")},
                         "corpus": {"documents": 10}, "serve": {"answers": ANSWERS}})
    assert grpo == [{"stage": "ppo", "label": "ppo (grpo)", "heldout_ppl": None, "task_accuracy": 0.3,
                     "sampled_accuracy": None}]  # no served_accuracy: no serve row; NaN is no value
    assert summary_rows({"pretrain": {"skipped": True}}) == []


def test_rl_reward_plot_puts_eval_points_on_a_second_axis_when_scales_differ():
    rows = [{"step": s, "rollout/reward_mean": 2.0 * s, "rollout/accuracy": 0.1 * s} for s in range(1, 6)]
    spec = CURVES["ppo"][0]
    series, twin = stage_series(rows, spec, [[0, 0.2], [5, 0.6]])
    assert twin
    by_label = {s.label: s for s in series}
    reward = by_label["reward, training rollouts"]
    assert (reward.axis, reward.kind) == ("left", "line")
    assert by_label["accuracy, training rollouts, right axis"].axis == "right"
    ev = by_label["accuracy, held-out prompts (greedy), right axis"]
    assert (ev.kind, ev.axis, list(ev.points)) == ("points", "right", [(0.0, 0.2), (5.0, 0.6)])
    same_scale = [{"step": s, "rollout/reward_mean": 0.1 * s, "rollout/accuracy": 0.1 * s} for s in range(1, 6)]
    series, twin = stage_series(same_scale, spec, [[0, 0.2]])
    assert not twin and {s.axis for s in series} == {"left"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from llmray.report.run_report import write_report
    from llmray.stages.pipeline import Paths

    paths = Paths(tmp_path_factory.mktemp("run") / "w")
    _write_metrics(paths)
    md_path = write_report(paths, _results())
    return md_path.parent, md_path.read_text(), (md_path.parent / "report.html").read_text()


def test_summary_figure_comes_first(report):
    out, md, html = report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images[0] == "summary.png" and (out / "summary.png").stat().st_size > 20_000
    assert md.index("summary.png") < md.index("## Answers from the served model") < md.index("## Stages")
    assert "| ppo | 402 | 0.43 | 0.31 | — | — |" in md
    assert "| serve | — | 0.43 | — | — | — |" in md
    assert "0.305 (step 0) → 0.36 (step 10) → 0.4 (step 20) → 0.43 (step 30)" in md
    assert sorted(images) == sorted(p.name for p in out.glob("*.png"))  # every PNG is in the report
    assert {"summary.png", "pretrain_loss.png", "ppo_reward.png", "ppo_kl.png"} <= set(images)
    # The html embeds every PNG, so it reads without a server or its directory.
    assert html.count("<img src=\"data:image/png;base64,") == len(images)


def test_answers_table_marks_each_answer(report):
    _, md, html = report
    assert "2 of 4 demo requests answered correctly" in md
    assert "| 1 | What is 12 + 7? | 19 | ✓ |" in md
    assert "| 2 | What is 3 * 4? | 7 \\| 12 | ✗ |" in md  # a pipe in an answer stays inside its cell
    assert "Accuracy of the endpoint on the held-out prompts: **0.43**; offline greedy accuracy of the same " \
           "model: **0.425** (served − offline = +0.005)." in md
    assert html.count('<span class="ok">✓</span>') == 2 and html.count('<span class="bad">✗</span>') == 2
    assert "<td>7 | 12</td>" in html
    assert "<b>0.43</b>" in html


def test_lm_eval_table_has_a_column_per_stage(report):
    _, md, html = report
    assert "| task | metric | sft | ppo |" in md
    assert "| llmray_arith | exact_match,none | 0.25 ± 0.031 | 0.41 ± 0.035 |" in md
    assert "| llmray_heldout_ppl | word_perplexity,none | — | 512.2 |" in md
    assert "exact_match_stderr" not in md  # folded into its metric's cell
    assert "<td class=\"r\">0.41 ± 0.035</td>" in html


def test_stage_table_and_same_content_in_html(report):
    _, md, html = report
    assert "| pretrain | 92.1 | final_loss=5.2; heldout_ppl=204.8; task_accuracy=0 |" in md
    assert "| ppo | 140 | steps=30; heldout_ppl=402; task_accuracy=0.43; sampled_accuracy=0.31 |" in md
    assert "Peak memory in use on the machine: 6.3 GiB (1.2 GiB at the start)" in md
    for heading in re.findall(r"^#+ (.+)$", md, re.MULTILINE):
        assert f">{heading}</h" in html
    for row in ("<td>pretrain</td><td class=\"r\">92.1</td>", "<th>model after</th>"):
        assert row in html


def test_report_without_serve_or_lm_eval(tmp_path):
    from llmray.report.run_report import write_report
    from llmray.stages.pipeline import Paths

    results = {"sft": {"heldout_ppl": 380.5, "task_accuracy": 0.305}, "corpus": {"documents": 4000}}
    md = write_report(Paths(tmp_path / "w"), results).read_text()
    assert "lm-eval" not in md and "served model" not in md
    assert "![held-out perplexity and task accuracy after each stage](summary.png)" in md
    assert "| corpus | — | documents=4000 |" in md


def test_quantize_table_shows_each_scheme_and_why_one_was_refused():
    from llmray.report.doc import to_markdown
    from llmray.report.sections import quantize_section

    rows = {"original": {"ppl": 98.9, "accuracy": 0.545, "tok_s": {"1": 270.0, "8": 1760.0}, "size_ratio": 1.0},
            "w8a8": {"ppl": 99.0, "ppl_increase": 0.001, "accuracy": 0.54, "size_ratio": 0.37,
                     "tok_s": {"1": 300.0, "8": 1990.0}, "speedup": {"1": 1.11, "8": 1.13}, "published": True,
                     "refused": []},
            "w4a16": {"ppl": 104.0, "ppl_increase": 0.052, "accuracy": 0.5, "size_ratio": 0.28,
                      "tok_s": {"1": 200.0, "8": 1100.0}, "speedup": {"1": 0.74, "8": 0.63}, "published": False,
                      "refused": ["held-out perplexity rose 5.20%"]}}
    md = to_markdown(quantize_section({"quantize": {"schemes": rows, "serving_concurrency": 8}}))
    lines = [x for x in md.splitlines() if x.startswith("| w")]
    assert len(lines) == 2 and "1,990 (1.13×)" in lines[0] and lines[0].rstrip(" |").endswith("yes")
    assert "no: held-out perplexity rose 5.20%" in lines[1] and "+5.20%" in lines[1]
    assert "Serving concurrency: 8" in md
    assert quantize_section({"quantize": {"skipped": True}}) == []
