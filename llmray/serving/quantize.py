"""Round-to-nearest per-channel INT8 (W8A8) or FP8 weight quantization in the compressed-tensors format
that vLLM loads, and `FakeQuant`, which runs a torch model on the same arithmetic vLLM will (weights
dequantized from the stored integers, activations fake-quantized per token) for the quality gate.

W8A8-INT8: int8 weights with one scale per output channel, int8 activations quantized per token at
run time (vLLM's CompressedTensorsW8A8Int8 kernels; these run on CPU). FP8-dynamic: the same with
float8_e4m3 (GPU; loads on CPU but is slow there). Neither needs calibration data, so the pinned
`compressed-tensors` library (for the config schema) is all we need. The recipe is `llmray.stages.quantize`.
"""

from __future__ import annotations

import logging

from llmray.errors import UserError

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn


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


class FakeQuant:
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
