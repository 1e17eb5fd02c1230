"""Stage `quantize`: llm-compressor schemes (W8A8 SmoothQuant+GPTQ, W4A16 GPTQ, FP8 dynamic, AWQ) run in
llm-compressor's own cached environment, calibrated on our held-out documents, then gated on the vLLM
engine that will serve them: held-out perplexity from the engine's prompt log-probs, greedy task accuracy,
and output tok/s at each concurrency against the unquantized model. A scheme is published only if quality
holds and it is smaller or faster as promised; the first scheme is `output`, the others `output-<scheme>`.

Local:   llmray quantize --config jobs/configs/quantize/w8a8_cpu.yaml model=runs/default/rl
Cluster: ray job submit --working-dir . -- python jobs/quantize.py --config jobs/configs/quantize/fp8_gpu.yaml

Why a venv the stage manages rather than a Ray `runtime_env` pip set: the venv persists across Ray sessions
(a runtime_env's pip environment lives in the session's directory and is rebuilt by every new cluster), its
build streams pip's progress here, and it layers over the main environment's torch instead of downloading one.
On a cluster the stage runs on one node and builds (or finds) the environment there (`llmray.envs`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmray import artifacts
from llmray.config import check, to_dict
from llmray.errors import GateRefused, UserError
from llmray.models.model_dir import check_model_dir
from llmray.serving import quantize as q

log = logging.getLogger(__name__)

Scheme = Literal["w8a8", "w4a16", "fp8_dynamic", "awq", "rtn_w8a8"]


@dataclass(frozen=True)
class QuantizeConfig:
    model: str = "artifacts/model"
    """Model artifact (or HF directory) to quantize."""
    output: str = "artifacts/model-w8a8"
    """Where the first scheme is published; further schemes go to `<output>-<scheme>`."""
    schemes: list[Scheme] = field(default_factory=lambda: ["w8a8"])
    """w8a8 | w4a16 | fp8_dynamic | awq (llm-compressor); rtn_w8a8 (round-to-nearest, no llm-compressor)."""
    ignore: list[str] = ("lm_head",)
    """Linear layers left in full precision (names)."""
    group_size: int = 128
    """Input channels per scale for w4a16 and awq; must divide the model's hidden and MLP widths."""
    smoothing_strength: float = 0.8
    """SmoothQuant's alpha for w8a8."""
    calibration_texts: str | None = None
    """Corpus artifact or JSONL directory for calibration; default: synthetic documents seeded apart."""
    calibration_samples: int = 64
    max_seq_length: int = 256
    max_ppl_increase: float = 0.05
    """Quality gate: held-out perplexity on the engine may rise at most this fraction."""
    max_accuracy_drop: float = 0.1
    """Quality gate: greedy task accuracy on the engine may fall at most this much (absolute)."""
    max_size_ratio: float = 0.6
    """Promise: weights at most this fraction of the original's bytes ..."""
    min_speedup: float = 1.1
    """... or output tok/s at least this multiple of the original's at `serving_concurrency`."""
    serving_concurrency: int = 8
    concurrencies: list[int] = (1, 8, 32)
    """Where output tok/s is measured (for the report's table)."""
    speed_tokens: int = 64
    eval_docs: int = 32
    """Held-out documents for perplexity (llmray.evaluation.heldout_documents: the report's own)."""
    eval_texts: str | None = None
    """Optional corpus artifact or JSONL directory of held-out text instead of synthetic documents."""
    eval_prompts: str | None = None
    """JSONL directory of {"prompt", "answer"} held-out task records (the corpus stage's `eval`); default:
    synthetic tasks seeded apart, operands up to `max_operand`."""
    eval_tasks: int = 64
    """Task prompts answered greedily by every variant (accuracy); 0 skips."""
    max_operand: int = 20
    max_eval_tokens: int = 256
    engine: dict[str, Any] = field(default_factory=lambda: {"max_model_len": 512})
    """EngineConfig of the measuring engine (llmray.vllm_engine)."""
    seed: int = 1234
    force: bool = False
    """Rebuild even if complete outputs exist."""

    def __post_init__(self) -> None:
        check(len(self.schemes) >= 1, "schemes", "must name at least one scheme")
        check(len(set(self.schemes)) == len(self.schemes), "schemes", "must not repeat a scheme")
        for s in self.schemes:
            check(s in q.SCHEMES, "schemes", f"unknown scheme {s!r}; known: {', '.join(q.SCHEMES)}")
        check(self.group_size in (32, 64, 128, 256), "group_size", "must be 32, 64, 128 or 256")
        check(0 < self.smoothing_strength < 1, "smoothing_strength", "must be in (0, 1)")
        check(self.calibration_samples >= 1, "calibration_samples", "must be >= 1")
        check(self.max_seq_length >= 16, "max_seq_length", "must be >= 16")
        check(self.max_ppl_increase >= 0, "max_ppl_increase", "must be >= 0")
        check(self.max_accuracy_drop >= 0, "max_accuracy_drop", "must be >= 0")
        check(self.max_size_ratio > 0, "max_size_ratio", "must be > 0")
        check(self.min_speedup > 0, "min_speedup", "must be > 0")
        check(self.serving_concurrency in self.concurrencies, "serving_concurrency", "must be one of concurrencies")
        check(all(c >= 1 for c in self.concurrencies), "concurrencies", "must be >= 1")
        check(self.eval_docs >= 1, "eval_docs", "must be >= 1")
        check(self.eval_tasks >= 0, "eval_tasks", "must be >= 0")
        check(self.max_eval_tokens >= 16, "max_eval_tokens", "must be >= 16")
        check(self.max_operand >= 1, "max_operand", "must be >= 1")
        check(self.speed_tokens >= 1, "speed_tokens", "must be >= 1")


Config = QuantizeConfig


def output_of(cfg: QuantizeConfig, scheme: str) -> Path:
    return Path(cfg.output) if scheme == cfg.schemes[0] else Path(f"{cfg.output}-{scheme}")


def _texts(source: str | None, n: int, seed: int | None, key: str) -> list[str]:
    """n documents from `source`, else synthetic ones seeded apart from the corpus (`seed`) or the report's
    held-out documents (`seed=None`)."""
    if source:
        from llmray.models.tokenizer import iter_texts

        texts = []
        for t in iter_texts(source):
            texts.append(t)
            if len(texts) >= n:
                break
        if not texts:
            raise UserError(f"{key}: no documents found in {source}")
        return texts
    import random

    from llmray import evaluation
    from llmray.data import synthetic

    if seed is None:
        return evaluation.heldout_documents(n)
    rng = random.Random(seed)  # seeds apart from the corpus stage's: unseen documents
    return [synthetic.document(rng) for _ in range(n)]


def _task_records(cfg: QuantizeConfig) -> list[dict]:
    import random

    from llmray.data import tasks
    from llmray.evaluation import read_jsonl_dir

    if cfg.eval_tasks == 0:
        return []
    if cfg.eval_prompts:
        rows = read_jsonl_dir(cfg.eval_prompts, cfg.eval_tasks)
        if not rows:
            raise UserError(f"eval_prompts: no records in {cfg.eval_prompts}")
        return rows
    rng = random.Random(cfg.seed + 1)
    return [tasks.prompt_record(tasks.make_task(rng, max_operand=cfg.max_operand)) for _ in range(cfg.eval_tasks)]


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def compress(cfg: QuantizeConfig, src: Path, work: Path, calibration: Path, python: Path | None) -> dict[str, Path]:
    """Every scheme's checkpoint into `work/<scheme>`: the llm-compressor schemes in one worker process in
    their environment (llm-compressor imported once), `rtn_w8a8` here."""
    out, specs = {}, []
    for s in cfg.schemes:
        (work / s).mkdir()
        out[s] = work / s
        if s == "rtn_w8a8":
            q.write_rtn_w8a8(src, work / s, cfg.ignore)
            continue
        spec = {"model": str(src), "output": str(work / s), "scheme": s, "calibration": str(calibration),
                "num_samples": cfg.calibration_samples, "max_seq_length": cfg.max_seq_length,
                "ignore": list(cfg.ignore), "group_size": cfg.group_size, "smoothing_strength": cfg.smoothing_strength}
        (work / f"{s}.json").write_text(json.dumps(spec))
        specs.append(str(work / f"{s}.json"))
    if specs:
        from llmray import envs

        def progress(line: str) -> None:  # llm-compressor's per-module lines stay at debug level
            (log.info if line.startswith("[compress]") else log.debug)("%s", line)

        worker = Path(__file__).resolve().parent.parent / "serving" / "compress_worker.py"
        envs.run_script(python, worker, specs, progress=progress)
    return out


def measure(cfg: QuantizeConfig, variants: dict[str, Path], tok) -> dict[str, dict[str, Any]]:
    """Every variant on its own vLLM engine: perplexity, greedy accuracy, tok/s (llmray.serving.probe)."""
    from llmray.data import tasks
    from llmray.serving.probe import ProbeSpec, probe

    max_len = min(cfg.max_eval_tokens, int(cfg.engine.get("max_model_len", 512)) - 1)  # + 1 generated token
    docs = [tok(t)["input_ids"][:max_len] for t in _texts(cfg.eval_texts, cfg.eval_docs, None, "eval_texts")]
    records = _task_records(cfg)
    prompts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for r in records]
    speed_prompts = prompts[:8] or [d[:32] for d in docs[:8]]
    spec = ProbeSpec(docs=[d for d in docs if len(d) >= 2], prompts=prompts, speed_prompts=speed_prompts,
                     concurrencies=tuple(cfg.concurrencies), speed_tokens=cfg.speed_tokens)
    engine = {**cfg.engine, "max_num_seqs": max(cfg.concurrencies)}
    raw = probe({k: (str(v), engine) for k, v in variants.items()}, spec, progress=log.info)
    for r in raw.values():
        answers = [tok.decode(a, skip_special_tokens=True) for a in r.pop("answers", [])]
        n = max(1, len(records))
        r["accuracy"] = sum(tasks.is_correct(x["answer"], a) for x, a in zip(records, answers)) / n if records else None
        r["mean_reward"] = sum(tasks.reward(x["answer"], a) for x, a in zip(records, answers)) / n if records else None
    return raw


def run(cfg: QuantizeConfig) -> dict:
    """Compress every scheme, measure them on vLLM, gate, publish. Raises UserError (nothing published) when
    the first scheme fails its gate; a further scheme that fails is reported and not published."""
    from llmray.models.tokenizer import load_tokenizer

    config = check_model_dir(cfg.model)
    if any(s in q.GROUPED for s in cfg.schemes):
        q.check_group_size(config, cfg.group_size)
    src = Path(cfg.model)
    outs = {s: output_of(cfg, s) for s in cfg.schemes}
    if all(artifacts.is_complete(o, "model") for o in outs.values()) and not cfg.force:
        m = artifacts.read_manifest(outs[cfg.schemes[0]])
        return {"output": str(outs[cfg.schemes[0]]), "skipped": "complete artifacts exist (force=true rebuilds)",
                **m.metrics}
    t0 = time.monotonic()
    python, env_built = None, False
    if any(s != "rtn_w8a8" for s in cfg.schemes):
        from llmray import envs

        python, env_built = envs.ensure(envs.LLMCOMPRESSOR)
    tok = load_tokenizer(src)
    out0 = outs[cfg.schemes[0]]
    out0.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out0.name}-work-", dir=out0.parent) as work:
        work = Path(work)
        calibration = work / "calibration.jsonl"
        with open(calibration, "w") as f:
            for t in _texts(cfg.calibration_texts, cfg.calibration_samples, cfg.seed + 2, "calibration_texts"):
                f.write(json.dumps({"text": t}) + "\n")
        log.info("compressing %s with %s", src, ", ".join(cfg.schemes))
        built = compress(cfg, src, work, calibration, python)
        measured = measure(cfg, {"original": src, **built}, tok)
        rows = _rows(cfg, measured, src, built)
        log.info("quantize gate (serving concurrency %d):\n%s", cfg.serving_concurrency,
                 q.table(rows, cfg.concurrencies))
        first = rows[cfg.schemes[0]]
        if first["refused"]:
            raise GateRefused(f"quantize gate refused {cfg.schemes[0]}: " + "; ".join(first["refused"])
                            + f". Nothing was published to {out0}.\n" + q.table(rows, cfg.concurrencies))
        metrics = {"schemes": rows, "env_built": env_built, "elapsed_s": round(time.monotonic() - t0, 1),
                   "serving_concurrency": cfg.serving_concurrency, "table": q.table(rows, cfg.concurrencies)}
        for s in cfg.schemes:
            if rows[s]["refused"]:
                continue
            with artifacts.publish(outs[s]) as tmp:
                for f in built[s].iterdir():
                    shutil.move(str(f), tmp / f.name)
                inputs = [src] if artifacts.is_complete(src) else []
                artifacts.write_manifest(tmp, "model", "llmray.stages.quantize", to_dict(cfg),
                                         {**_flat(rows[s], cfg), **metrics}, inputs)
    return {"output": str(out0), **_flat(first, cfg), **metrics}


def _rows(cfg: QuantizeConfig, measured: dict, src: Path, built: dict[str, Path]) -> dict[str, dict]:
    base = measured["original"]
    size_ref = _dir_bytes(src)
    rows = {"original": {"ppl": base["ppl"], "accuracy": base["accuracy"], "tok_s": base["tok_s"],
                         "bytes": size_ref, "size_ratio": 1.0}}
    for s, d in built.items():
        m = measured[s]
        row = {"scheme": s, "ppl": round(m["ppl"], 4), "ppl_original": round(base["ppl"], 4),
               "mean_reward": None if m["mean_reward"] is None else round(m["mean_reward"], 4),
               "ppl_increase": round(m["ppl"] / base["ppl"] - 1.0, 5), "accuracy": m["accuracy"],
               "accuracy_original": base["accuracy"],
               "accuracy_drop": (None if m["accuracy"] is None else round(base["accuracy"] - m["accuracy"], 4)),
               "tok_s": m["tok_s"], "bytes": _dir_bytes(d), "size_ratio": round(_dir_bytes(d) / max(1, size_ref), 4),
               "speedup": {c: round(v / base["tok_s"][c], 3) for c, v in m["tok_s"].items() if base["tok_s"].get(c)}}
        row["refused"] = q.verdict(row, cfg.max_ppl_increase, cfg.max_accuracy_drop, cfg.max_size_ratio,
                                   cfg.min_speedup, cfg.serving_concurrency)
        row["published"] = not row["refused"]
        rows[s] = row
    return rows


def _flat(row: dict, cfg: QuantizeConfig) -> dict:
    """The headline figures of one scheme, under the keys the report and pipeline read."""
    return {"method": row["scheme"], "ppl_original": row["ppl_original"], "ppl_quantized": row["ppl"],
            "ppl_increase": row["ppl_increase"], "max_ppl_increase": cfg.max_ppl_increase,
            "size_ratio": row["size_ratio"],
            "task_accuracy_original": row["accuracy_original"], "task_accuracy_quantized": row["accuracy"],
            "speedup": row["speedup"], "heldout_ppl": round(row["ppl"], 3), "task_accuracy": row["accuracy"],
            "task_mean_reward": row["mean_reward"], "measured_on": "vllm"}
