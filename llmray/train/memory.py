"""Pre-launch memory estimate per worker: model states by ZeRO stage / offload / precision, plus activations.

Model states follow the seeds' bytes-per-parameter accounting (ZeRO paper): mixed-precision Adam is
2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master, m, v) = 16 bytes per parameter; fp32 Adam is
4 + 4 + 8 = 16 too. Measured on this machine, torch's foreach AdamW adds ~8 bytes per parameter of
step() temporaries at the peak, counted with the optimizer (and offloaded with it). ZeRO-1 divides
the optimizer part by the worker count, ZeRO-2 also the gradients, ZeRO-3 also the weights. Offload
moves the optimizer states (and, at ZeRO-3, the weights) to host memory, which on a CPU-only machine
is the same memory: there it is counted under `host_gb`.
Activations per layer per token use the Megatron estimate (34·h + 5·a·s bytes at 16 bits, doubled
for fp32; ~2·h with activation checkpointing, plus one layer recomputed), plus the logits and their
gradient. A fixed runtime overhead (CUDA context ~1.3 GB per the seeds; torch + DeepSpeed + Ray
worker on CPU) is added last.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmray.errors import UserError
from llmray.models.factory import ModelShape
from llmray.train.deepspeed_config import DeepSpeedConfig

GB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    overhead_gb: float
    device_gb: float
    """Memory on the accelerator (on a CPU-only machine: everything)."""
    host_gb: float
    """Offloaded states kept in host RAM (already inside device_gb on a CPU-only machine)."""

    def states_and_activations_gb(self) -> float:
        return self.weights_gb + self.grads_gb + self.optimizer_gb + self.activations_gb

    def summary(self) -> str:
        return (f"{self.params / 1e6:.1f}M params: weights {self.weights_gb:.3f} GB + grads {self.grads_gb:.3f} "
                f"+ optimizer {self.optimizer_gb:.3f} + activations {self.activations_gb:.3f} "
                f"+ runtime {self.overhead_gb:.2f} = {self.device_gb:.2f} GB per worker"
                + (f" ({self.host_gb:.2f} GB of it offloaded to host)" if self.host_gb else ""))


def estimate(
    shape: ModelShape,
    ds: DeepSpeedConfig,
    seq_len: int,
    num_workers: int,
    trainable_params: int | None = None,
    on_gpu: bool = False,
    overhead_gb: float | None = None,
    copies: int = 1,
) -> MemoryEstimate:
    """Expected peak memory per worker. `trainable_params` < params for LoRA (only they carry grads and
    Adam states); `copies` = forward passes held at once (2 for a chosen/rejected pair)."""
    n = shape.num_params()
    t = n if trainable_params is None else trainable_params
    w = max(1, num_workers)
    bf16 = ds.precision == "bf16"
    weight_b = 2 if bf16 else 4
    grad_b = 2 if bf16 else 4
    # fp32 master + m + v. DeepSpeed's ZeRO optimizer keeps its own fp32 partition of the weights even
    # when training in fp32, so only plain DP (stage 0) in fp32 gets away with m + v.
    opt_b = 8 if (not bf16 and ds.zero_stage == 0) else 12
    weights = n * weight_b
    # DeepSpeed flattens the weights into contiguous buffers at initialize: one transient extra copy
    # (of this rank's partition at ZeRO-3) exists at the peak.
    flatten = n * weight_b / (w if ds.zero_stage >= 3 else 1)
    grads = t * grad_b
    optim = t * opt_b
    # torch's foreach AdamW (our client optimizer, also under offload) materialises about two fp32
    # temporaries per parameter during step() (sqrt of v, the update), where the optimizer runs.
    optim += t * 8
    if ds.zero_stage >= 1:
        optim /= w
    if ds.zero_stage >= 2:
        grads /= w
    if ds.zero_stage >= 3:
        weights /= w
    host = 0.0
    if ds.offload_optimizer:
        host += optim
    if ds.offload_params:
        host += weights
    act = activations_bytes(shape, ds, seq_len) * copies
    if overhead_gb is None:
        overhead_gb = 1.3 if on_gpu else 0.0
    weights += flatten
    dev = weights + grads + optim + act
    if on_gpu:
        dev -= host
    return MemoryEstimate(
        params=n, weights_gb=weights / GB, grads_gb=grads / GB, optimizer_gb=optim / GB,
        activations_gb=act / GB, overhead_gb=overhead_gb, device_gb=dev / GB + overhead_gb, host_gb=host / GB,
    )


def activations_bytes(shape: ModelShape, ds: DeepSpeedConfig, seq_len: int) -> float:
    b, s, h, a, L, v = (ds.micro_batch_size, seq_len, shape.hidden_size, shape.num_heads, shape.num_layers,
                        shape.vocab_size)
    scale = 1.0 if ds.precision == "bf16" else 2.0  # the formula counts 16-bit activations
    # SwiGLU's three intermediate projections instead of GPT's 4h MLP: scale the MLP part (19 of the 34).
    mlp_ratio = (3 * shape.intermediate_size) / (4 * h * 2)
    per_layer_token = (15 * h + 19 * h * mlp_ratio + 5 * a * s) * scale
    if ds.activation_checkpointing:
        layers = 2 * h * scale * L * b * s + per_layer_token * b * s  # saved inputs + one layer recomputed
    else:
        layers = per_layer_token * b * s * L
    logits = b * s * v * 4 * 4  # fp32 logits, their shifted fp32 copy, log-softmax and gradient
    return layers + logits


def check_budget(est: MemoryEstimate, budget_gb: float | None, ds: DeepSpeedConfig, num_workers: int,
                 prefix: str = "", workers_key: str = "scaling.num_workers", budget_what: str | None = None) -> None:
    """Refuse to start when the estimate exceeds the budget, naming the setting to change. `prefix` is
    the DeepSpeed section's parent (`actor.` for the RL actor); `budget_what` says what the budget is
    (default: `memory_budget_gb=<budget>`)."""
    if budget_gb is None or est.device_gb <= budget_gb:
        return
    d = f"{prefix}deepspeed"
    hints = []
    if est.activations_gb > 0.3 * est.device_gb:
        if not ds.activation_checkpointing:
            hints.append(f"{d}.activation_checkpointing=true")
        if ds.micro_batch_size > 1:
            hints.append(f"a smaller {d}.micro_batch_size (now {ds.micro_batch_size}; "
                         f"raise grad_accum_steps to keep the batch)")
    if ds.zero_stage < 3:
        hints.append(f"{d}.zero_stage={ds.zero_stage + 1}")
    elif not ds.offload_optimizer:
        hints.append(f"{d}.offload_optimizer=true")
    elif not ds.offload_params:
        hints.append(f"{d}.offload_params=true")
    if ds.precision == "fp32":
        hints.append(f"{d}.precision=bf16")
    hints.append(f"more workers ({workers_key}, now {num_workers})")
    what = budget_what or f"memory_budget_gb={budget_gb:g}"
    raise UserError(
        f"estimated memory per worker {est.device_gb:.2f} GB exceeds {what} "
        f"({est.summary()}); change: " + ", or ".join(hints)
    )


def inference_gb(shape: ModelShape, micro_batch_size: int, seq_len: int, bytes_per_param: int = 4,
                 on_gpu: bool = False) -> float:
    """A frozen model's forward pass without gradients (the RL ref and reward roles): its weights, one
    layer's activations at a time and the fp32 logits, plus the runtime overhead."""
    b, s, h = micro_batch_size, seq_len, shape.hidden_size
    act = b * s * (4 * h + 2 * shape.intermediate_size) * 4 + b * s * shape.vocab_size * 4 * 2
    return (shape.num_params() * bytes_per_param + act) / GB + (1.3 if on_gpu else 0.0)
