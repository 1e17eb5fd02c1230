"""Stage `eval`: evaluate a Hugging Face model directory or a live OpenAI-compatible endpoint.

Local:   llmray eval --config jobs/configs/eval/tiny_cpu.yaml model=runs/default/rl
         llmray eval --config jobs/configs/eval/tiny_cpu.yaml endpoint=http://127.0.0.1:8000/v1
Cluster: ray job submit --working-dir . -- python jobs/eval.py --config jobs/configs/eval/tiny_cpu.yaml model=...

What it measures (docs/eval.md), each where its input allows:
- `heldout_ppl`, `task_accuracy` (greedy), `eval_examples`: llmray.evaluation on the model directory,
  the one implementation the pipeline and the quantize gate use;
- `served_accuracy`: greedy chat answers from the endpoint (for `model=DIR`, one this stage starts
  on 127.0.0.1 and stops), scored by llmray.data.tasks;
- `lm_eval`: EleutherAI's lm-eval harness against the endpoint on the tasks in llmray/eval_tasks/;
- `offline_accuracy`: greedy answers of the model directory from an offline vLLM engine (Ray Data LLM
  or the rollout engine, `offline.backend`), and `served_offline_gap` against `served_accuracy`.
The results are written to `<output>/results.json`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmray.cluster import RayConfig
from llmray.config import build, check
from llmray.eval_harness import ALL_TASKS
from llmray.errors import UserError
from llmray.vllm_engine import EngineConfig

log = logging.getLogger(__name__)

MAX_GAP = 0.03
"""Served greedy accuracy must equal offline greedy accuracy within this (same model, same tokens)."""


@dataclass(frozen=True)
class LmEvalConfig:
    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    """Shipped tasks to run (llmray/eval_tasks/): llmray_arith (generation), llmray_arith_mc and
    llmray_heldout (loglikelihood: need the model's tokenizer, from `model` or `tokenizer`)."""
    limit: int | None = None
    """At most this many documents per task (None: all)."""
    num_concurrent: int = 8
    """Requests lm-eval keeps in flight."""

    def __post_init__(self) -> None:
        for t in self.tasks:
            check(t in ALL_TASKS, "lm_eval.tasks", f"unknown task {t!r}; shipped: {', '.join(ALL_TASKS)}")
        check(self.limit is None or self.limit >= 1, "lm_eval.limit", "must be >= 1 (or null for all)")
        check(self.num_concurrent >= 1, "lm_eval.num_concurrent", "must be >= 1")


@dataclass(frozen=True)
class OfflineConfig:
    enabled: bool = True
    backend: Literal["auto", "ray_data", "vllm"] = "auto"
    """`ray_data`: Ray Data LLM's vLLM engine processor on the Ray cluster; `vllm`: llmray.vllm_engine's
    offline engine (the RL rollout's) in a local process; `auto`: ray_data, falling back to vllm (with
    the error in `offline_fallback_reason`) if Ray Data LLM fails."""
    batch_size: int = 64
    """Rows per batch sent to each Ray Data LLM engine."""
    concurrency: int = 1
    """Ray Data LLM engine replicas (data parallel)."""

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "offline.batch_size", "must be >= 1")
        check(self.concurrency >= 1, "offline.concurrency", "must be >= 1")


@dataclass(frozen=True)
class EvalConfig:
    model: str | None = None
    """Hugging Face model directory to evaluate (with its tokenizer)."""
    endpoint: str | None = None
    """OpenAI-compatible base URL (`http://host:port/v1`) to evaluate instead of serving `model`."""
    api_key_env: str = "LLMRAY_API_KEY"
    """Environment variable holding the endpoint's bearer key (unset: no key)."""
    served_model_name: str | None = None
    """Model name for requests to `endpoint` (None: the first one its /v1/models lists)."""
    tokenizer: str | None = None
    """Tokenizer directory for loglikelihood tasks against an `endpoint` (default: `model`)."""
    prompts: str | None = None
    """Directory of JSONL held-out prompts (`{"prompt": messages, "answer"}`, a corpus' `eval/`);
    None: `num_prompts` generated tasks seeded apart from the corpus'."""
    num_prompts: int = 200
    heldout_documents: int = 64
    """Held-out synthetic documents for perplexity (llmray.evaluation.heldout_documents)."""
    max_new_tokens: int = 16
    heldout: bool = True
    """Perplexity and greedy accuracy with transformers on `model`."""
    served: bool = True
    """Greedy accuracy of the endpoint (started from `model` when no `endpoint`)."""
    concurrency: int = 8
    """Requests in flight for `served_accuracy`."""
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    """vLLM engine of the endpoint this stage starts and of the offline generation."""
    output: str = "runs/eval"
    """Directory for results.json and lm-eval's task data."""
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check(self.endpoint is None or self.endpoint.startswith(("http://", "https://")), "endpoint",
              f"must be an http(s) URL ending in /v1, got {self.endpoint!r}")
        for k in ("num_prompts", "max_new_tokens", "concurrency"):
            check(getattr(self, k) >= 1, k, "must be >= 1")
        check(self.heldout_documents >= 1, "heldout_documents", "must be >= 1")


Config = EvalConfig


def load_prompts(path: str | None, n: int, seed: int = 4242) -> list[dict]:
    """Held-out prompt records: the first `n` in a JSONL directory, or `n` generated tasks."""
    from llmray.data import tasks
    from llmray.evaluation import read_jsonl_dir

    if path is None:
        return [tasks.prompt_record(tasks.make_task(random.Random(f"eval-{seed}-{i}"))) for i in range(n)]
    if not Path(path).is_dir():
        raise UserError(f"prompts: no such directory: {path}")
    rows = read_jsonl_dir(path, n)
    if not rows:
        raise UserError(f"prompts: no JSONL records in {path}")
    return rows


def model_metrics(model_dir: str, rows: list[dict], docs: list[str], sampled_k: int = 0) -> dict:
    """Held-out perplexity on `docs`; greedy task accuracy on `rows` (none: skipped); mean@k and
    pass@k of `sampled_k` samples (0: skipped). llmray.evaluation, transformers on CPU."""
    from llmray import evaluation

    loaded = evaluation.load(model_dir)
    out: dict[str, Any] = {"heldout_ppl": round(evaluation.perplexity(loaded, docs), 3)}
    if rows:
        acc = evaluation.task_accuracy(loaded, rows)
        out.update(task_accuracy=round(acc["accuracy"], 4), task_mean_reward=round(acc["mean_reward"], 4),
                   eval_examples=acc["examples"])
        if sampled_k:
            sampled = evaluation.sampled_accuracy(loaded, rows, k=sampled_k)
            out.update(sampled_accuracy=round(sampled["mean_at_k"], 4),
                       sampled_pass_at_k=round(sampled["pass_at_k"], 4))
    return out


def endpoint_metrics(url: str, rows: list[dict], docs: list[str], out_dir: str | Path, api_key: str | None = None,
                     model_name: str | None = None, tokenizer: str | None = None, max_tokens: int = 16,
                     concurrency: int = 8, lm_eval: LmEvalConfig | None = None, max_model_len: int = 256) -> dict:
    """`served_accuracy` (+ `served_answers`) and `lm_eval` of a live endpoint."""
    from llmray.eval_generate import endpoint_answers, score

    out: dict[str, Any] = {}
    t = time.monotonic()
    served = score(rows, endpoint_answers(url, rows, api_key, model_name, max_tokens, concurrency))
    out.update(served_accuracy=round(served["accuracy"], 4), served_n=served["n"], served_answers=served["answers"],
               served_s=round(time.monotonic() - t, 1))
    lm_eval = lm_eval or LmEvalConfig()
    if lm_eval.enabled and lm_eval.tasks:
        from llmray.eval_harness import run_lm_eval

        t = time.monotonic()
        if model_name is None:
            from openai import OpenAI

            model_name = OpenAI(base_url=url, api_key=api_key or "none").models.list().data[0].id
        out["lm_eval"], skipped = run_lm_eval(
            url, model_name, rows, docs, Path(out_dir) / "lm_eval_tasks", tokenizer=tokenizer, api_key=api_key,
            tasks=tuple(lm_eval.tasks), limit=lm_eval.limit, num_concurrent=lm_eval.num_concurrent,
            max_length=max_model_len)
        out["lm_eval_s"] = round(time.monotonic() - t, 1)
        if skipped:
            out["lm_eval_skipped"] = skipped
    return out


def offline_metrics(model_dir: str, rows: list[dict], offline: OfflineConfig, engine: EngineConfig,
                    max_tokens: int = 16) -> dict:
    """`offline_accuracy` (+ `offline_answers`, `offline_backend`) of `model_dir`."""
    from llmray.config import to_dict
    from llmray.eval_generate import offline_answers, score

    t = time.monotonic()
    texts, backend, fallback = offline_answers(model_dir, rows, offline.backend, to_dict(engine), max_tokens,
                                               offline.batch_size, offline.concurrency)
    res = score(rows, texts)
    out = {"offline_accuracy": round(res["accuracy"], 4), "offline_answers": res["answers"],
           "offline_backend": backend, "offline_s": round(time.monotonic() - t, 1)}
    if fallback:
        out["offline_fallback_reason"] = fallback
    return out


def compare(result: dict) -> dict:
    """Served vs offline: accuracy gap, share of identical answers, and whether the gap is within MAX_GAP."""
    served, offline = result.get("served_answers"), result.get("offline_answers")
    if not served or not offline:
        return {}
    same = sum(a["answer"] == b["answer"] for a, b in zip(served, offline)) / len(served)
    gap = abs(result["served_accuracy"] - result["offline_accuracy"])
    return {"served_offline_gap": round(gap, 4), "served_offline_same_answers": round(same, 4),
            "served_matches_offline": gap <= MAX_GAP}


def on_endpoint(section: dict, serve_cfg, handle, model_id: str, rows: list[dict], heldout_documents: int,
                out_dir: str | Path) -> dict:
    """This stage on a live endpoint the pipeline started (`section`: the pipeline's `eval` section, EvalConfig
    keys) and on the served model directory offline; a failure is reported in `eval_error`, not fatal."""
    from llmray import evaluation

    # Offline answers from the rollout engine by default here: one engine process starts sooner than
    # Ray Data LLM's actor pools and takes no CPUs from the serving replica (docs/eval.md).
    offline = {"backend": "vllm", **section.get("offline", {})}
    ecfg = build(EvalConfig, {**section, "offline": offline, "model": str(serve_cfg.model)}, prefix="eval")
    if not rows or not ecfg.served:
        return {}
    out: dict[str, Any] = {}
    try:
        out.update(endpoint_metrics(
            handle.url, rows, evaluation.heldout_documents(heldout_documents), out_dir, handle.api_key, model_id,
            str(serve_cfg.model), ecfg.max_new_tokens, ecfg.concurrency, ecfg.lm_eval, serve_cfg.engine.max_model_len))
        if ecfg.offline.enabled:
            out.update(offline_metrics(str(serve_cfg.model), rows, ecfg.offline, serve_cfg.engine, ecfg.max_new_tokens))
        out.update(compare(out))
    except Exception as e:  # noqa: BLE001 - the run's artifacts stand; the report names what failed
        log.warning("evaluation of the served model failed: %s", e)
        out["eval_error"] = str(e)[:300]
    out.pop("served_answers", None)
    out.pop("offline_answers", None)
    if "served_accuracy" in out:
        print(f"  served greedy accuracy {out['served_accuracy']:.3f} on {out['served_n']} held-out prompts; "
              + (f"offline ({out['offline_backend']}) {out['offline_accuracy']:.3f}; gap "
                 f"{out['served_offline_gap']:.3f} (must be <= {MAX_GAP})" if "offline_accuracy" in out
                 else "offline skipped"), flush=True)
    for task, metrics in out.get("lm_eval", {}).items():
        print(f"  lm-eval {task}: {json.dumps(metrics)}", flush=True)
    return out


def _start_local(cfg: EvalConfig):
    from llmray.cluster import init_ray
    from llmray.config import to_dict
    from llmray.serving.config import ServeConfig
    from llmray.serving.server import start

    init_ray(cfg.ray)
    serve_cfg = build(ServeConfig, {"model": cfg.model, "host": "127.0.0.1", "port": 0, "app_name": "llmray-eval",
                                    "api_key_env": None, "engine": to_dict(cfg.engine), "ingress": "proxy"})
    return start(serve_cfg)


def run(cfg: EvalConfig) -> dict:
    """Evaluate `model` and/or `endpoint`; write and return the results."""
    from llmray.evaluation import heldout_documents
    from llmray.models.model_dir import check_model_dir

    if not (cfg.model or cfg.endpoint):
        raise UserError("model: set `model` (a model directory) or `endpoint` (an OpenAI-compatible URL)")
    if cfg.model:
        check_model_dir(cfg.model, "model")
    rows = load_prompts(cfg.prompts, cfg.num_prompts)
    docs = heldout_documents(cfg.heldout_documents)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": cfg.model, "endpoint": cfg.endpoint, "eval_prompts": len(rows)}
    if cfg.model and cfg.heldout:
        result.update(model_metrics(cfg.model, rows, docs))
    if cfg.served and (cfg.endpoint or cfg.model):
        handle = None if cfg.endpoint else _start_local(cfg)
        try:
            url = cfg.endpoint or handle.url
            key = os.environ.get(cfg.api_key_env) if cfg.endpoint else handle.api_key
            result.update(endpoint_metrics(
                url, rows, docs, out_dir, key, cfg.served_model_name, cfg.tokenizer or cfg.model,
                cfg.max_new_tokens, cfg.concurrency, cfg.lm_eval, cfg.engine.max_model_len))
        finally:
            if handle is not None:
                handle.shutdown()
    if cfg.model and cfg.offline.enabled:
        if cfg.offline.backend != "vllm":  # Ray Data LLM runs on the Ray cluster
            from llmray.cluster import init_ray

            init_ray(cfg.ray)
        result.update(offline_metrics(cfg.model, rows, cfg.offline, cfg.engine, cfg.max_new_tokens))
    result.update(compare(result))
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    _print(result)
    return {k: v for k, v in result.items() if not k.endswith("_answers")}


def _print(result: dict) -> None:
    for k in ("heldout_ppl", "task_accuracy", "served_accuracy", "offline_accuracy", "served_offline_gap"):
        if k in result:
            print(f"  {k:<20} {result[k]}", flush=True)
    for task, metrics in result.get("lm_eval", {}).items():
        print(f"  lm_eval {task:<12} {json.dumps(metrics)}", flush=True)
