"""The run report's sections as blocks (llmray.report.doc): held-out scores, served answers, lm-eval
results, the stage table, monitor warnings, dropped documents. Pure: results dict in, blocks out."""

from __future__ import annotations

import math
from typing import Any

from llmray.report.doc import Block, Bullets, Heading, Para, Table, cell
from llmray.report.summary import summary_rows

KEY_NUMBERS = ("documents", "documents_in", "documents_out", "duplicates_removed", "exact_duplicates",
               "near_duplicates", "tokens", "num_tokens", "num_sequences", "final_loss", "steps",
               "tokens_per_s", "accuracy", "eval_accuracy", "heldout_accuracy", "heldout_ppl",
               "task_accuracy", "sampled_accuracy", "task_mean_reward", "mean_reward", "perplexity_increase",
               "size_ratio", "latency_p50_s", "prompt_filter_kept", "prompt_filter_pool", "eval/accuracy",
               "served_accuracy", "offline_accuracy", "restarts", "rollout_restarts", "trainer_restarts")
MARK = {True: "✓", False: "✗"}


def fmt(v: Any, digits: int = 4) -> str:
    """A number for a table: floats to `digits` significant figures (at least the integer part), numbers
    from 10**digits up with thousands separators; anything else as text; None as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return cell(v)
    if isinstance(v, int) or not math.isfinite(v):
        return f"{v:,}" if isinstance(v, int) and abs(v) >= 10 ** digits else str(v)
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def heldout_section(results: dict) -> list[Block]:
    """The summary figure's numbers as a table, and the RL stage's held-out accuracy by step."""
    rows = summary_rows(results)
    if not rows:
        return []
    table = Table(["model after", "held-out ppl", "task accuracy (greedy)", "sampled accuracy (mean@k)", "pass@k",
                   "mean reward"], [], align=["l", "r", "r", "r", "r", "r"])
    for r in rows:
        res = results.get(r["stage"], {})
        table.rows.append([r["label"], fmt(r["heldout_ppl"]), fmt(r["task_accuracy"]), fmt(r["sampled_accuracy"]),
                           fmt(res.get("sampled_pass_at_k")), fmt(res.get("task_mean_reward"))])
    out: list[Block] = [Para("Task accuracy is greedy; sampled accuracy is the mean correctness of k samples per "
                             "prompt at temperature 1 (mean@k), the policy as RL samples and trains it; pass@k is "
                             "the share of prompts with at least one correct sample. `serve` is the endpoint's "
                             "greedy accuracy on the same held-out prompts."), table]
    evals = (results.get("ppo") or {}).get("eval_accuracy") or []
    pairs = [p for p in evals if isinstance(p, (list, tuple)) and len(p) == 2]
    if pairs:
        steps = " → ".join(f"{fmt(a, 3)} (step {s})" for s, a in pairs)
        out.append(Para(f"RL held-out greedy accuracy during training: {steps}."))
    return out


def serve_section(results: dict) -> list[Block]:
    """The served answers with ✓/✗, and served against offline accuracy."""
    serve = results.get("serve") or {}
    answers = [a for a in serve.get("answers") or [] if isinstance(a, dict)]
    served, offline = serve.get("served_accuracy"), serve.get("offline_accuracy")
    if not answers and served is None:
        return []
    out: list[Block] = [Heading("Answers from the served model")]
    if served is not None:
        text = f"Accuracy of the endpoint on the held-out prompts: **{fmt(served)}**"
        if isinstance(offline, (int, float)) and isinstance(served, (int, float)):
            text += (f"; offline greedy accuracy of the same model: **{fmt(offline)}** "
                     f"(served − offline = {served - offline:+.3f})")
        out.append(Para(text + "."))
    if answers:
        right = sum(1 for a in answers if a.get("correct") is True)
        out.append(Para(f"{right} of {len(answers)} demo requests answered correctly (greedy, through the "
                        "OpenAI-compatible endpoint):"))
        out.append(Table(["#", "prompt", "answer", "correct"],
                         [[str(i), cell(a.get("prompt")), cell(a.get("answer")), MARK.get(a.get("correct"), "?")]
                          for i, a in enumerate(answers, 1)], align=["r", "l", "l", "l"]))
    return out


def _lm_eval_cells(metrics: dict) -> dict[str, str]:
    """{metric: "value ± stderr"}: an `X_stderr,F` metric joins its `X,F` value instead of a row of its own."""
    out = {}
    for name, v in metrics.items():
        base, _, filt = name.partition(",")
        if base.endswith("_stderr") and f"{base[:-7]},{filt}".rstrip(",") in metrics:
            continue
        err = metrics.get(f"{base}_stderr,{filt}" if filt else f"{base}_stderr")
        ok = isinstance(err, (int, float)) and not isinstance(err, bool) and math.isfinite(err)
        out[name] = fmt(v) + (f" ± {fmt(err, 2)}" if ok else "")
    return out


def lm_eval_section(results: dict) -> list[Block]:
    """results[stage]["lm_eval"] = {task: {metric: value}} for any stage, as one table with a column per stage."""
    by_stage = {s: r["lm_eval"] for s, r in results.items()
                if isinstance(r, dict) and isinstance(r.get("lm_eval"), dict)}
    if not by_stage:
        return []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for stage, tasks in by_stage.items():
        for task, metrics in tasks.items():
            metrics = metrics if isinstance(metrics, dict) else {"value": metrics}
            for metric, text in _lm_eval_cells(metrics).items():
                cells.setdefault((task, metric), {})[stage] = text
    stages = list(by_stage)
    rows = [[cell(task), cell(metric)] + [vals.get(s, "—") for s in stages] for (task, metric), vals in cells.items()]
    return [Heading("lm-eval harness"),
            Para("EleutherAI lm-evaluation-harness scores on the repository's task definitions over held-out data, "
                 "by the model after each stage (± standard error where the harness reports one)."),
            Table(["task", "metric"] + stages, rows, align=["l", "l"] + ["r"] * len(stages))]


def stage_table(stages: dict[str, dict], seconds: dict[str, float]) -> list[Block]:
    """stage | seconds | key numbers (KEY_NUMBERS found in the stage's results, at most 14)."""
    rows = []
    for stage, res in stages.items():
        if not isinstance(res, dict):
            continue
        secs = seconds.get(stage, res.get("elapsed_s"))
        flat = flatten(res)
        nums = [f"{k}={fmt(v)}" for k, v in flat.items()
                if k.split(".")[-1] in KEY_NUMBERS]
        if res.get("skipped"):
            nums.insert(0, "artifact complete, skipped")
        rows.append([stage, fmt(secs) if secs is not None else "—", cell("; ".join(nums[:14]) or None)])
    return [Heading("Stages"), Table(["stage", "seconds", "key numbers"], rows, align=["l", "r", "l"])]


def warnings_section(stages: dict[str, dict]) -> list[Block]:
    items = [f"{s}: {w}" for s, r in stages.items() if isinstance(r, dict)
             for w in r.get("reward_hacking_warnings") or []]
    return [Heading("Monitor warnings"), Bullets(items)] if items else []


def dropped_section(results: dict) -> list[Block]:
    flat = flatten(results.get("clean-dedup") or {})
    rows = [[k, fmt(v)] for k, v in flat.items()
            if ("drop" in k.lower() or "removed_by_reason" in k) and isinstance(v, (int, float))]
    if not rows:
        return []
    return [Heading("Documents dropped, by reason"), Table(["reason", "documents"], rows, align=["l", "r"])]


def quantize_section(results: dict) -> list[Block]:
    """The quantize gate's table: every scheme against the original, measured on the serving vLLM engine."""
    q = results.get("quantize") or {}
    rows = q.get("schemes") if isinstance(q.get("schemes"), dict) else {}
    if not rows and not q.get("refused"):
        return []
    out: list[Block] = [Heading("Quantization gate"),
                        Para("Each scheme (llm-compressor) against the original, measured on the vLLM engine that "
                             "serves it: held-out perplexity from the engine's prompt log-probs, greedy task accuracy, "
                             "output tok/s per concurrency (speedup over the original). Serving concurrency: "
                             f"{q.get('serving_concurrency', '?')}.")]
    if rows:
        cs = sorted({c for r in rows.values() for c in (r.get("tok_s") or {})}, key=int)
        table = Table(["scheme", "size ratio", "held-out ppl", "ppl change", "task accuracy"]
                      + [f"tok/s c={c}" for c in cs] + ["published"], [], align=["l"] + ["r"] * (4 + len(cs)) + ["l"])
        for name, r in rows.items():
            speed = [fmt(r.get("tok_s", {}).get(c), 1) + (f" ({fmt(r['speedup'][c], 3)}×)"
                                                          if c in (r.get("speedup") or {}) else "") for c in cs]
            change = f"{100 * r['ppl_increase']:+.2f}%" if "ppl_increase" in r else "—"
            pub = "—" if name == "original" else ("yes" if r.get("published") else "no: " + "; ".join(r["refused"]))
            table.rows.append([name, fmt(r.get("size_ratio", 1.0)), fmt(r.get("ppl")), change, fmt(r.get("accuracy")),
                               *speed, cell(pub)])
        out.append(table)
    if q.get("refused"):
        out.append(Para(f"Refused: {cell(q['refused'].splitlines()[0])} The endpoint serves the RL model."))
    return out
