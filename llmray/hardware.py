"""What this machine has (CUDA, native bf16) and the dtype an inference engine should run in for `auto`.

On a CPU without native bf16 (no AVX512-BF16 or AMX), bf16 arithmetic is emulated: vLLM measured
here (2 cores, no AVX-512) ran an 11M-parameter model at ~300 tok/s in bf16 and ~1,160 tok/s in
fp32. GPUs and bf16-capable CPUs use bf16. Quantized checkpoints keep the dtype they were saved with.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

@cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no (working) torch means no CUDA
        return False


def engine_dtype(requested: str, model_dir: str | Path | None = None, gpu: bool | None = None) -> str:
    """`requested` unless it is `auto`; then the quantized checkpoint's own choice (`auto` for vLLM),
    bf16 on a GPU or a bf16-capable CPU, else fp32. `gpu`: whether the engine runs on a GPU (None: this
    machine has CUDA; `llmray plan` passes what the described cluster has)."""
    if requested != "auto":
        return requested
    if model_dir is not None:
        cfg = Path(model_dir) / "config.json"
        if cfg.is_file() and "quantization_config" in json.loads(cfg.read_text()):
            return "auto"
    return "bfloat16" if (has_cuda() if gpu is None else gpu) or cpu_has_native_bf16() else "float32"
