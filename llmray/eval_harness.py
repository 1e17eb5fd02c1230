"""EleutherAI's lm-eval harness against an OpenAI-compatible endpoint, on task definitions shipped in
`llmray/eval_tasks/` over our own held-out data (written to local JSON files; nothing from a hub).

    results, skipped = run_lm_eval(url, model_name, rows, docs, out_dir, tokenizer=model_dir)
    # results: {"llmray_arith": {"exact_match": 0.31, "n": 200}, "llmray_heldout": {...}, ...}

The generation task runs through `local-chat-completions` (the server applies the chat template, the
same path as the served-accuracy check); the loglikelihood tasks run through `local-completions`
(echoed prompt logprobs), which needs the model's tokenizer to split context from continuation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
GENERATE_TASKS = ("llmray_arith",)
LOGLIKELIHOOD_TASKS = ("llmray_arith_mc", "llmray_heldout")
ALL_TASKS = GENERATE_TASKS + LOGLIKELIHOOD_TASKS


def arith_docs(rows: list[dict]) -> list[dict]:
    """`{"prompt": messages, "answer"}` eval records -> the generation task's documents."""
    return [{"question": r["prompt"][-1]["content"], "answer": str(r["answer"]), "kind": r.get("kind", "")}
            for r in rows]


def arith_mc_docs(rows: list[dict], render, seed: int = 0) -> list[dict]:
    """Four-way choice documents: the chat-templated prompt (`render(messages) -> str`) and the gold
    answer among three distinct wrong ones, in a seeded order."""
    from llmray.data import tasks

    out = []
    for i, r in enumerate(rows):
        rng = random.Random(f"mc-{seed}-{i}")
        task = tasks.Task(r.get("kind", "add"), r["prompt"][-1]["content"], str(r["answer"]))
        wrong: list[str] = []
        for _ in range(50):
            w = tasks.wrong_answer(task, rng)
            if w != task.answer and w not in wrong:
                wrong.append(w)
            if len(wrong) == 3:
                break
        answers = [task.answer, *wrong]
        rng.shuffle(answers)
        out.append({"context": render(r["prompt"]), "gold": answers.index(task.answer),
                    "choices": [f"{tasks.ANSWER_PREFIX} {a}." for a in answers]})
    return out


def write_task_dir(out_dir: str | Path, data: dict[str, list[dict]]) -> Path:
    """Write each `data[file_stem]` as JSONL and the shipped task YAMLs with their `{data_dir}` set,
    under `out_dir`; return the directory to pass to lm-eval's TaskManager as `include_path`."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stem, docs in data.items():
        with open(out / f"{stem}.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
    for y in sorted(TASKS_DIR.glob("*.yaml")):
        (out / y.name).write_text(y.read_text().replace("{data_dir}", str(out)))
    return out


def flatten_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's `simple_evaluate` output -> `{task: {metric: value, "n": examples}}`.

    lm-eval keys metrics as `metric,filter` (e.g. `exact_match,answer`, `acc,none`); the filter name
    is dropped (each shipped task has one filter). Non-numeric entries (alias) and `sample_len` (the
    same as `n`) are left out."""
    out: dict[str, dict[str, float]] = {}
    samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            row[key.split(",")[0]] = float(value)
        n = samples.get(task, {}).get("effective")
        if n is not None:
            row["n"] = int(n)
        out[task] = row
    return out


def run_lm_eval(base_url: str, model_name: str, rows: list[dict], docs: list[str], out_dir: str | Path,
                tokenizer: str | None = None, api_key: str | None = None, tasks: tuple[str, ...] = ALL_TASKS,
                limit: int | None = None, num_concurrent: int = 8,
                max_length: int = 256) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Run the shipped `tasks` against the endpoint at `base_url` (`.../v1`) in this process.

    Loglikelihood tasks need `tokenizer` (a local directory with the model's tokenizer); without one
    they are skipped. `max_length` is the endpoint's context window. Returns
    (`{task: {metric: value, "n": N}}`, `{skipped task: why}`)."""
    import os

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    render = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)

        def render(messages):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    task_dir = write_task_dir(out_dir, {
        "arith": arith_docs(rows),
        "arith_mc": arith_mc_docs(rows, render) if render else [],
        "heldout": [{"text": d} for d in docs],
    })
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    if api_key:  # lm-eval's local-* models read the key from the environment
        os.environ["OPENAI_API_KEY"] = api_key
    base = base_url.rstrip("/")
    common = {"model": model_name, "num_concurrent": num_concurrent, "max_retries": 2, "timeout": 300,
              "max_length": max_length - 1}  # echo requests add one generated token
    out: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    gen = [t for t in tasks if t in GENERATE_TASKS]
    if gen:
        res = simple_evaluate(model="local-chat-completions",
                              model_args={**common, "base_url": f"{base}/chat/completions"}, tasks=gen,
                              task_manager=manager, apply_chat_template=True, limit=limit,
                              log_samples=False, bootstrap_iters=0)
        out.update(flatten_results(res))
    ll = [t for t in tasks if t in LOGLIKELIHOOD_TASKS]
    if ll and tokenizer:
        res = simple_evaluate(model="local-completions",
                              model_args={**common, "base_url": f"{base}/completions", "tokenizer": str(tokenizer),
                                          "tokenizer_backend": "huggingface", "tokenized_requests": True},
                              tasks=ll, task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=0)
        out.update(flatten_results(res))
    elif ll:
        skipped = {t: "loglikelihood tasks need the model's tokenizer (set `tokenizer`)" for t in ll}
    return out, skipped
