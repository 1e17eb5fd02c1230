"""Typed configs of the serve stage: model, engine, limits, deployment/autoscaling, auth and release gate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmray.cluster import RayConfig
from llmray.config import check
from llmray.vllm_engine import EngineConfig


@dataclass(frozen=True)
class LimitsConfig:
    max_queue: int = 64
    """Sequences a replica accepts beyond `engine.max_num_seqs` (they wait for a slot). Past it: 503 at
    once. A request counts as prompts x max(n, best_of) sequences."""
    request_timeout_s: float = 120.0
    """A request not finished after this long is aborted: 504 (or an error event if already streaming)."""
    max_body_bytes: int = 1_000_000
    """Larger request bodies get a 413 before they are parsed."""
    max_n: int = 8
    """Largest `n` (completions per prompt)."""
    max_logprobs: int = 5
    """Largest `logprobs` (completions) / `top_logprobs` (chat)."""
    max_prompts: int = 32
    """Largest batch of prompts in one completions request."""
    default_max_tokens: int = 256
    """Chat: used when a request omits max_tokens and max_completion_tokens (capped by the context left
    after the prompt). Completions keep OpenAI's default of 16."""

    def __post_init__(self) -> None:
        check(self.max_queue >= 0, "limits.max_queue", "must be >= 0")
        check(self.request_timeout_s > 0, "limits.request_timeout_s", "must be > 0")
        check(self.max_body_bytes >= 1024, "limits.max_body_bytes", "must be >= 1024")
        for k in ("max_n", "max_prompts", "default_max_tokens"):
            check(getattr(self, k) >= 1, f"limits.{k}", "must be >= 1")
        check(0 <= self.max_logprobs <= 20, "limits.max_logprobs", "must be in [0, 20]")


@dataclass(frozen=True)
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    """Serve adds replicas when the average ongoing requests per replica exceed this."""
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0

    def __post_init__(self) -> None:
        check(self.min_replicas >= 0, "deployment.autoscaling.min_replicas", "must be >= 0")
        check(self.max_replicas >= max(1, self.min_replicas), "deployment.autoscaling.max_replicas",
              f"must be >= max(1, min_replicas={self.min_replicas})")
        check(self.target_ongoing_requests > 0, "deployment.autoscaling.target_ongoing_requests", "must be > 0")


@dataclass(frozen=True)
class DeploymentConfig:
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int | None = None
    """Requests Serve routes to one replica at once; default engine.max_num_seqs + limits.max_queue."""
    max_queued_requests: int = 128
    """Requests each proxy holds when every replica is full; past it Serve answers 503."""
    num_cpus: float = 1.0
    """CPUs reserved per replica (the engine's work runs in its child process)."""
    num_gpus: float = 0.0
    graceful_shutdown_timeout_s: float = 60.0
    """On shutdown/redeploy, in-flight requests get this long to finish."""
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        check(self.max_ongoing_requests is None or self.max_ongoing_requests >= 1,
              "deployment.max_ongoing_requests", "must be >= 1")
        check(self.max_queued_requests >= 1 or self.max_queued_requests == -1,
              "deployment.max_queued_requests", "must be >= 1 (or -1 for unbounded)")
        check(self.num_cpus >= 0 and self.num_gpus >= 0, "deployment.num_cpus", "resources must be >= 0")


@dataclass(frozen=True)
class GateConfig:
    enabled: bool = False
    """Before deploying, measure each candidate (speculation, quantized model) against the plain
    engine at `concurrency` and keep only those at least `min_speedup` faster."""
    concurrency: int = 1
    """Target concurrency of the deployment: the load the decision is measured at."""
    min_speedup: float = 1.05
    num_requests: int = 16
    max_tokens: int = 64
    candidates: list[Literal["ngram", "draft", "quantized"]] = field(default_factory=lambda: ["ngram"])
    quantized_model: str | None = None
    """Quantized model dir for the `quantized` candidate (from `llmray quantize`)."""
    draft_model: str | None = None
    """Draft model dir for the `draft` candidate."""

    def __post_init__(self) -> None:
        check(self.concurrency >= 1, "gate.concurrency", "must be >= 1")
        check(self.min_speedup > 0, "gate.min_speedup", "must be > 0")
        check(self.num_requests >= 1 and self.max_tokens >= 1, "gate.num_requests", "must be >= 1")
        check("quantized" not in self.candidates or bool(self.quantized_model), "gate.quantized_model",
              "required when gate.candidates has quantized")
        check("draft" not in self.candidates or bool(self.draft_model), "gate.draft_model",
              "required when gate.candidates has draft")


@dataclass(frozen=True)
class OpenAIConfig:
    """vLLM's OpenAI layer, as `vllm serve` flags."""
    tool_call_parser: str | None = "hermes"
    """Parser of tool calls in the model's output. `hermes` (`<tool_call>{"name", "arguments"}</tool_call>`)
    fits the ChatML template our tokenizer ships; None: no tool calls."""
    tool_strict_level: Literal["auto", "function", "parameter"] = "parameter"
    """With `structural_tags`: `parameter` pins tool-call arguments to their schemas; vLLM's default
    `auto` constrains arguments only for tools marked `strict`."""
    structural_tags: bool = False
    """False (llmray's default): forced tool calls (`tool_choice` required or a named function) are
    generated under a JSON schema of the declared functions and their argument schemas, without free
    whitespace, so they parse even from a weak model. True: vLLM's structural tags for the parser's
    `<tool_call>` format (VLLM_ENFORCE_STRICT_TOOL_CALLING), whose grammar allows free whitespace."""
    structured_outputs_backend: str = "xgrammar"
    disable_any_whitespace: bool = True
    """Structured outputs without free whitespace: a small model cannot ramble spaces until max_tokens."""
    extra_args: list[str] = field(default_factory=list)
    """More `vllm serve` frontend flags, passed through unchanged (e.g. ["--enable-prompt-tokens-details"])."""


@dataclass(frozen=True)
class LoRAServeConfig:
    adapters: dict[str, str] = field(default_factory=dict)
    """Adapter name -> directory of an unmerged PEFT adapter (the `adapter/` folder of an `llmray sft`
    model trained with lora.enabled: true).
    Each is listed in /v1/models and selected with `model: <name>`; the base stays servable."""
    max_lora_rank: int = 16
    max_loras: int = 2
    """Adapters batched at once."""

    def __post_init__(self) -> None:
        check(self.max_lora_rank >= 1 and self.max_loras >= 1, "lora.max_lora_rank", "must be >= 1")


@dataclass(frozen=True)
class ServeConfig:
    model: str = "artifacts/model"
    """Model artifact or HF directory to serve."""
    served_model_name: str | None = None
    """Name clients pass as `model`; default: the directory's name."""
    host: str = "127.0.0.1"
    """Address the HTTP server binds (the proxy, or the replica with `ingress: direct`); loopback by
    default (set 0.0.0.0 deliberately)."""
    port: int = 8000
    """HTTP port (0: pick a free one). An already running Serve keeps its own port."""
    app_name: str = "llm"
    route_prefix: str = "/"
    api_key: str | None = None
    """Bearer key required on every route except /health and /ready (and /metrics needs it too)."""
    api_key_env: str | None = "LLMRAY_API_KEY"
    """Environment variable read for the key when `api_key` is unset (keeps secrets out of YAML). It is
    read where the application is built (the driver) and shipped to every replica in the deployment's
    config. Without a key the server starts only on a loopback `host` (fail closed)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    lora: LoRAServeConfig = field(default_factory=LoRAServeConfig)
    prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (system prompts, chat history); hit rate in /metrics."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    ingress: Literal["auto", "proxy", "direct"] = "auto"
    """How HTTP reaches the replica. `proxy`: Serve's HTTP proxy routes each request (load balancing
    across replicas, autoscaling). `direct`: Serve's direct ingress; the replica itself listens on
    `port` and requests bypass the proxy (one busy process and one hop fewer per request and per
    streamed chunk), for one replica. Needs a Ray cluster started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1, which
    `llmray serve` sets on the local cluster it starts (see `direct_ingress_env`). `auto`: `direct`
    for one replica (max_replicas 1) when `llmray serve` starts its own cluster or the cluster has
    direct ingress on; `proxy` otherwise (an autoscaled deployment, or a shared cluster)."""
    stream_flush_ms: float = 50.0
    """Streaming: SSE events ready within this window leave the replica as one HTTP chunk, which
    saves a hop through Serve's proxy per token. The first chunk is never held; 0 = send whatever
    is ready at once, without waiting."""
    block: bool = True
    """`run`: wait for Ctrl-C after the server is up (false: return at once, leaving it running)."""
    ready_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, "port", "must be in [0, 65535]")
        check(self.route_prefix.startswith("/"), "route_prefix", "must start with /")
        check(self.api_key is None or len(self.api_key) >= 8, "api_key", "must be at least 8 characters")
        check(self.ready_timeout_s > 0, "ready_timeout_s", "must be > 0")
        check(self.ingress != "direct" or self.deployment.autoscaling.max_replicas == 1, "ingress",
              "direct ingress has no load balancer in front of the replicas: use it with "
              f"deployment.autoscaling.max_replicas=1 (got {self.deployment.autoscaling.max_replicas}), "
              "or ingress=proxy to autoscale")
        check(0 <= self.stream_flush_ms <= 1000, "stream_flush_ms", f"must be in [0, 1000], got {self.stream_flush_ms}")

    def replica_env(self) -> dict[str, str]:
        """Environment of the replica process (read by vLLM's OpenAI layer)."""
        return {"VLLM_ENFORCE_STRICT_TOOL_CALLING": "1" if self.openai.structural_tags else "0"}

    def serving_engine_kwargs(self) -> dict:
        """Engine arguments the server adds to `engine_kwargs` (the RL rollout engine does not)."""
        o = self.openai
        kw = {"enable_prefix_caching": self.prefix_caching,
              "structured_outputs_config": {"backend": o.structured_outputs_backend,
                                            "disable_any_whitespace": o.disable_any_whitespace}}
        if self.lora.adapters:
            kw.update(enable_lora=True, max_lora_rank=self.lora.max_lora_rank, max_loras=self.lora.max_loras)
        return kw

    def name(self) -> str:
        from pathlib import Path

        return self.served_model_name or Path(self.model).resolve().name
