"""Stage `pipeline`, the main job: corpus -> clean/dedup -> tokenizer -> pack -> pretrain -> SFT -> reward
model -> RL -> quantize -> serve, one artifact per stage under one work directory, then a run report.

Local:   llmray pipeline --config jobs/configs/pipeline/default.yaml [--from sft] [--until ppo] [--keep-serving]
Cluster: ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/pipeline/default.yaml

Each stage is the same `run(cfg)` that `llmray <stage>` calls. The pipeline only wires paths: stage
N reads stage N-1's artifact. A stage whose artifact is complete (its manifest exists) is skipped on
a re-run; an interrupted one resumes (training stages from their newest complete checkpoint).
Every stage's config section is validated before any work starts, so a bad key fails in seconds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmray import artifacts
from llmray import config as cfglib
from llmray.cluster import RayConfig
from llmray.config import ConfigError, check
from llmray.errors import GateRefused, UserError
from llmray.report.memory import PeakMemory
from llmray.stages import STAGES, get

log = logging.getLogger(__name__)

# (stage name, pipeline config section, output dir under workdir, artifact kind), in lifecycle order.
STEPS: tuple[tuple[str, str, str, str], ...] = tuple(
    (s.name, s.section, s.artifact, s.kind) for s in STAGES.values() if s.section is not None)
STEP_NAMES = tuple(s[0] for s in STEPS)


@dataclass(frozen=True)
class PipelineConfig:
    workdir: str = "runs/default"
    """Every artifact of the run lives under here, one directory per stage."""
    corpus_path: str | None = None
    """Your own corpus (JSONL/Parquet file, dir or glob with a `text` column) instead of the synthetic one."""
    from_stage: str | None = None
    """First stage to run (`--from`); earlier stages' artifacts must exist."""
    until_stage: str | None = None
    """Last stage to run (`--until`)."""
    keep_serving: bool = False
    """Leave the endpoint up after the demo requests (Ctrl-C stops it)."""
    force: bool = False
    """Redo stages even when their artifact is complete."""
    demo_requests: int = 4
    """Requests sent to the endpoint at the end, one held-out prompt of each task kind in turn; their
    answers are printed."""
    eval_prompts: int = 200
    heldout_documents: int = 64
    sampled_k: int = 4
    """Samples per held-out prompt (temperature 1) for the sampled accuracy (mean@k) of the SFT and
    RL models: the policy as RL trains it. 0 skips it."""
    ray: RayConfig = field(default_factory=RayConfig)
    corpus: dict[str, Any] = field(default_factory=dict)
    clean_dedup: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    pack: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    reward_model: dict[str, Any] = field(default_factory=dict)
    rl: dict[str, Any] = field(default_factory=dict)
    quantize: dict[str, Any] = field(default_factory=dict)
    draft: dict[str, Any] = field(default_factory=dict)
    """The draft stage (llmray.stages.draft): a draft model distilled from the RL model, and the speculative
    gate measured on the model that is served; its decision configures the endpoint's speculation."""
    serve: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    """The eval stage's settings for the served model (llmray.stages.eval.EvalConfig keys: lm_eval,
    offline, concurrency, max_new_tokens, served); its model, engine and prompts are the run's."""

    def __post_init__(self) -> None:
        for key in ("from_stage", "until_stage"):
            v = getattr(self, key)
            check(v is None or v in STEP_NAMES, key, f"unknown stage {v!r}; stages: {', '.join(STEP_NAMES)}")
        if self.from_stage and self.until_stage:
            check(STEP_NAMES.index(self.from_stage) <= STEP_NAMES.index(self.until_stage), "until_stage",
                  f"{self.until_stage} comes before from_stage {self.from_stage}")
        check(self.demo_requests >= 0, "demo_requests", "must be >= 0")
        check(self.sampled_k >= 0, "sampled_k", f"must be >= 0 (0 skips the sampled accuracy), got {self.sampled_k}")
        from llmray.stages.eval import EvalConfig

        for key in ("model", "endpoint", "prompts", "output", "engine"):
            check(key not in self.eval, f"eval.{key}", "set by the pipeline (the served model, its engine and the "
                  "run's prompts)")
        cfglib.build(EvalConfig, self.eval, prefix="eval")  # a bad key fails before any work


Config = PipelineConfig


class Paths:
    """Where each stage's artifact lives under the work directory."""

    def __init__(self, workdir: str | Path):
        # Absolute: Ray Train workers run in their own directories, and manifests record these paths.
        self.root = Path(workdir).resolve()
        for name, _, sub, _ in STEPS:
            setattr(self, _attr(name), str(self.root / sub))
        self.report = str(self.root / "report")

    def of(self, stage: str) -> str:
        return getattr(self, _attr(stage))

    def run_dir(self, stage: str) -> str:
        """Checkpoints, metric logs and plots of a training stage (kept apart from its artifact,
        which is replaced atomically when it is published)."""
        return str(self.root / "runs" / _attr(stage))


def _attr(stage: str) -> str:
    return stage.replace("-", "_")


def wiring(cfg: PipelineConfig, p: Paths) -> dict[str, dict[str, Any]]:
    """The keys (dotted for nested sections) of each stage's config that point at the previous
    stage's artifact."""
    corpus_docs = cfg.corpus_path or f"{p.corpus}/docs"
    return {
        "corpus": {"output": p.corpus},
        "clean-dedup": {"input": corpus_docs, "output": p.clean_dedup},
        "tokenizer": {"corpus": p.clean_dedup, "output": p.tokenizer},
        "pack": {"input": p.clean_dedup, "tokenizer": p.tokenizer, "output": p.pack},
        "pretrain": {"dataset": p.pack, "tokenizer": p.tokenizer, "output": p.pretrain,
                     "run_dir": p.run_dir("pretrain")},
        "sft": {"model": p.pretrain, "data": f"{p.corpus}/sft", "mix.data": p.pack, "output": p.sft,
                "run_dir": p.run_dir("sft")},
        "reward-model": {"model": p.sft, "data": f"{p.corpus}/preference", "output": p.reward_model,
                         "run_dir": p.run_dir("reward-model")},
        # The RL stage's final eval on its running engines is the pipeline's RL evaluation: the same
        # held-out prompts and sample count as the other stages' (see _evaluate).
        "ppo": {"model": p.sft, "reward.model": p.reward_model, "prompts": f"{p.corpus}/prompts",
                "eval_prompts": f"{p.corpus}/eval", "num_eval": cfg.eval_prompts, "eval_sampled_k": cfg.sampled_k,
                "output": p.ppo, "run_dir": p.run_dir("ppo")},
        "quantize": {"model": p.ppo, "output": p.quantize, "eval_prompts": f"{p.corpus}/eval",
                     "eval_tasks": cfg.eval_prompts, "eval_docs": cfg.heldout_documents},
        # Distil from the unquantized RL model (the KL term runs it in torch); measure speculation on the served one.
        "draft": {"model": p.ppo, "gate.model": p.quantize, "output": p.draft},
        "serve": {"model": p.quantize},
    }


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Build and validate every stage's typed config (errors name `section.key`)."""
    p = Paths(cfg.workdir)
    wired = wiring(cfg, p)
    out = {}
    for name, section, _, _ in STEPS:
        if name == "corpus" and cfg.corpus_path:
            continue
        user = getattr(cfg, section)
        for dotted in wired[name]:
            if _get(user, dotted.split(".")) is not None:
                raise ConfigError(f"{section}.{dotted}: set by the pipeline (it wires stages together); remove it")
        data = cfglib.apply_overrides(user, [f"{k}={json.dumps(v)}" for k, v in wired[name].items()])
        cls = get(name).config_class()
        if "ray" in cls.__dataclass_fields__:
            data.setdefault("ray", cfglib.to_dict(cfg.ray))
        out[name] = cfglib.build(cls, data, prefix=section)
    return out


def _get(d: dict, path: list[str]):
    for part in path:
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _selected(cfg: PipelineConfig) -> list[str]:
    lo = STEP_NAMES.index(cfg.from_stage) if cfg.from_stage else 0
    hi = STEP_NAMES.index(cfg.until_stage) if cfg.until_stage else len(STEP_NAMES) - 1
    names = list(STEP_NAMES[lo : hi + 1])
    if cfg.corpus_path and "corpus" in names:
        names.remove("corpus")
    return names


def _check_inputs(cfg: PipelineConfig, first: str, p: Paths) -> None:
    """Fail before any work when the corpus path or an artifact the first stage reads is missing."""
    path = cfg.corpus_path
    if path and "://" not in path and not any(c in path for c in "*?[") and not Path(path).exists():
        raise UserError(f"corpus_path does not exist: {path}")
    for name, _, _, kind in STEPS[: STEP_NAMES.index(first)]:
        if name == "corpus" and cfg.corpus_path:
            continue
        if kind and not artifacts.is_complete(p.of(name)):
            raise UserError(f"--from {first}: the {name} artifact it needs is missing or incomplete: "
                            f"{p.of(name)} (run without --from, or with --from {name})")


def run(cfg: PipelineConfig) -> dict:
    """Run the selected span of stages; write the run report; print answers from the endpoint."""
    from llmray.cluster import init_ray

    p = Paths(cfg.workdir)
    configs = stage_configs(cfg)  # fail on any bad key before work starts
    names = _selected(cfg)
    _check_inputs(cfg, names[0], p)
    p.root.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray)
    results: dict[str, dict] = _load_results(p)
    timings: dict[str, float] = {}
    with PeakMemory() as mem:
        _run_stages(cfg, names, configs, p, results, timings)
    from llmray.report.run_report import RUN_KEY, write_report

    results[RUN_KEY] = {"peak_memory_gib": round(mem.peak_gib, 2), "start_memory_gib": round(mem.start_gib, 2),
                        "stage_seconds": timings}
    _save_results(p, results)
    report = write_report(p, results)
    _print_timings(timings, mem)
    return {"workdir": str(p.root), "report": str(report), "stage_seconds": timings,
            "answers": results.get("serve", {}).get("answers", []), "peak_memory_gib": round(mem.peak_gib, 2)}


def _run_stages(cfg: PipelineConfig, names: list[str], configs: dict, p: Paths, results: dict,
                timings: dict) -> None:
    total = len(names)
    for i, name in enumerate(names, 1):
        start = time.monotonic()
        if name == "serve":
            _banner(i, total, name, "starting")
            results["serve"] = serve_and_ask(cfg, configs["serve"], p)
        elif not cfg.force and artifacts.is_complete(p.of(name)):
            _banner(i, total, name, "done already, skipped")
            results.setdefault(name, {"skipped": True})
            continue
        else:
            _banner(i, total, name, "running")
            stage_cfg = configs[name]
            if cfg.force:
                stage_cfg = _with_force(stage_cfg)
            if name == "draft" and not artifacts.is_complete(p.quantize):  # the quantize gate refused: RL model
                stage_cfg = cfglib.replace(stage_cfg, gate=cfglib.replace(stage_cfg.gate, model=p.ppo))
            try:
                results[name] = dict(get(name).run_fn()(stage_cfg) or {})
            except GateRefused as e:  # a refused artifact is a result, not a failed run: serve falls back
                log.warning("%s: %s", name, e)
                results[name] = {"refused": str(e)}
            results[name].update(_evaluate(cfg, name, p, results[name]))
        timings[name] = round(time.monotonic() - start, 1)
        results[name]["elapsed_s"] = timings[name]
        _save_results(p, results)
        _banner(i, total, name, f"finished in {timings[name]:.0f}s")


def _with_force(stage_cfg):
    fields = getattr(stage_cfg, "__dataclass_fields__", {})
    return cfglib.replace(stage_cfg, force=True) if "force" in fields else stage_cfg


def _evaluate(cfg: PipelineConfig, name: str, p: Paths, stage_result: dict) -> dict:
    """Held-out perplexity and task accuracy for stages that produce a causal LM: the eval stage's
    `model_metrics` (llmray.stages.eval). The quantized model is measured by the quantize stage's own gate
    on the vLLM engine that serves it (its result carries `heldout_ppl` and `task_accuracy`).

    The RL stage scores the held-out prompts itself, on its vLLM engines at the end of the run (the
    same greedy tokens as transformers in fp32; in `make run`, 200 greedy and 800 sampled answers took
    17 s there against ~22 s in transformers here): its task scores are kept and only the perplexity
    is computed here."""
    if name not in ("pretrain", "sft", "ppo"):
        return {}
    from llmray import evaluation
    from llmray.stages.eval import model_metrics

    model_dir = p.of(name)
    out: dict[str, Any] = {}
    try:
        eval_rows = evaluation.read_jsonl_dir(f"{p.corpus}/eval", cfg.eval_prompts)
        if "task_accuracy" in stage_result and (not cfg.sampled_k or "sampled_accuracy" in stage_result):
            eval_rows = []  # scored by the stage itself
        out = model_metrics(model_dir, eval_rows, evaluation.heldout_documents(cfg.heldout_documents),
                            sampled_k=cfg.sampled_k if name in ("sft", "ppo") else 0)
    except Exception as e:  # noqa: BLE001 - a model transformers cannot load (e.g. quantized) is reported, not fatal
        log.warning("evaluation of %s skipped: %s", name, e)
        out["eval_error"] = str(e)[:300]
    log.info("eval %s: %s", name, {k: v for k, v in out.items() if k != "eval_examples"})
    return out


def serve_and_ask(cfg: PipelineConfig, serve_cfg, p: Paths) -> dict:
    """Start the endpoint, send the demo requests with the official openai client, print answers;
    then the eval stage on it: served greedy accuracy on the held-out prompts, lm-eval against it, and
    the offline greedy accuracy of the same model directory (they must agree within MAX_GAP)."""
    import random
    import statistics

    from llmray.data import tasks
    from llmray.evaluation import read_jsonl_dir
    from llmray.serving.server import start
    from llmray.serving.speculative import with_gate_speculation
    from llmray.stages import eval as evalstage

    if not artifacts.is_complete(serve_cfg.model):  # the quality gate refused the quantized model
        log.warning("quantized model not published (gate); serving the RL model instead")
        serve_cfg = cfglib.replace(serve_cfg, model=p.ppo)
    serve_cfg = with_gate_speculation(serve_cfg, p.draft)
    handle = start(serve_cfg)
    answers, latencies, tokens = [], [], 0
    try:
        from openai import OpenAI

        client = OpenAI(base_url=handle.url, api_key=handle.api_key or "none", timeout=120)
        model_id = client.models.list().data[0].id
        eval_rows = read_jsonl_dir(f"{p.corpus}/eval", cfg.eval_prompts)
        rows = tasks.spread_over_kinds(eval_rows, cfg.demo_requests) or [
            tasks.prompt_record(tasks.make_task(random.Random(i))) for i in range(cfg.demo_requests)]
        t0 = time.monotonic()
        for row in rows[: cfg.demo_requests]:
            s = time.monotonic()
            r = client.chat.completions.create(model=model_id, messages=row["prompt"], max_tokens=16, temperature=0)
            latencies.append(time.monotonic() - s)
            tokens += r.usage.completion_tokens
            text = r.choices[0].message.content
            answers.append({"prompt": row["prompt"][-1]["content"], "answer": text,
                            "correct": tasks.is_correct(row["answer"], text)})
            print(f"  Q: {row['prompt'][-1]['content']}\n  A: {text}")
        wall = time.monotonic() - t0
        result = {"url": handle.url, "answers": answers, "served_model_dir": str(serve_cfg.model),
                  "speculative": serve_cfg.engine.speculative.method,
                  "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
                  "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None}
        result.update(evalstage.on_endpoint(cfg.eval, serve_cfg, handle, model_id, eval_rows,
                                            cfg.heldout_documents, p.root / "eval" / "serve"))
        if cfg.keep_serving:
            print(f"serving at {handle.url} (Ctrl-C to stop)")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return result
    finally:
        handle.shutdown()


def _banner(i: int, n: int, name: str, what: str) -> None:
    print(f"[{i}/{n}] {name}: {what}", flush=True)


def _print_timings(timings: dict[str, float], mem: PeakMemory) -> None:
    print("\nTime per stage:")
    for name, s in timings.items():
        print(f"  {name:<14} {s:8.1f} s")
    print(f"  {'total':<14} {sum(timings.values()):8.1f} s")
    print(f"Peak memory in use on this machine: {mem.peak_gib:.1f} GiB (was {mem.start_gib:.1f} GiB at the start)")


def _load_results(p: Paths) -> dict:
    import json

    f = p.root / "results.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _save_results(p: Paths, results: dict) -> None:
    import json
    import os

    f = p.root / "results.json"
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, f)

