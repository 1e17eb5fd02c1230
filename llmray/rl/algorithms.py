"""From a scored batch to advantages, for PPO, GRPO and RLOO: one pure function the controller calls.

PPO (Ouyang et al. 2022; Ziegler et al. 2019): per-token reward = -beta * KL_t plus the score on
the last token; GAE(gamma, lambda) with the critic's values; advantages whitened over the batch.
GRPO (Shao et al. 2024): (r - mean_group) / std_group per sequence, broadcast to its tokens; KL to
the reference as a loss term (default) or in the reward. RLOO (Ahmadian et al. 2024): r minus the
mean of the other samples of the same prompt. Variants as config choices (see AlgoConfig): DAPO's
dynamic sampling and clip-higher, GSPO's sequence-level ratio, Dr. GRPO's unnormalised advantages
and loss; `informative_groups` is DAPO's filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from llmray.config import check

if TYPE_CHECKING:
    import torch

    from llmray.rl.batch import RLBatch


@dataclass(frozen=True)
class AlgoConfig:
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    """ppo (critic + GAE), grpo (group-normalised rewards), rloo (leave-one-out baseline). No critic for grpo/rloo."""
    n_samples: int = 4
    """Responses sampled per prompt (the group size of GRPO/RLOO; PPO may use 1)."""
    prompts_per_step: int = 8
    """Prompts per RL step; the rollout batch is prompts_per_step * n_samples rows."""
    epochs: int = 1
    """Passes over the rollout batch per step (PPO's inner epochs)."""
    minibatch_size: int = 16
    """Rows per optimizer step, over all actor (and critic) ranks."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon."""
    value_clip: float | None = 0.2
    """Critic value clipping around the old values; null = plain MSE."""
    gamma: float = 1.0
    lam: float = 0.95
    """GAE lambda."""
    critic_warmup: int = 0
    """PPO: the first steps train only the critic (the actor keeps its weights), so that a critic
    starting from the reward model's head has fitted the returns' scale before its values shape the
    actor's advantages (veRL's `critic_warmup`)."""
    whiten_advantages: bool = True
    """PPO: normalise advantages to zero mean, unit std over the batch's tokens."""
    grpo_normalize_std: bool = True
    """GRPO: divide by the group's std (false = Dr. GRPO's mean-centring only)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL(actor || ref) estimator for the reward penalty (the loss term always uses k3)."""
    kl_coef: float = 0.05
    """Initial KL coefficient beta."""
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    kl_target: float = 6.0
    """Adaptive controller: target KL per sequence (nats)."""
    kl_horizon: float = 10000.0
    kl_in_reward: bool | None = None
    """KL penalty in the reward (PPO, RLOO default) or as a loss term (GRPO default)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight in the policy loss."""
    ptx_coef: float = 0.0
    """PPO-ptx gamma: weight of the LM loss on `ptx_data` mixed into every actor minibatch."""
    tis_cap: float | None = None
    """Truncated importance sampling cap on pi_actor/pi_rollout (train-inference gap correction); null = off."""
    clip_eps_high: float | None = None
    """Upper ratio clip, decoupled from `clip_eps` (DAPO's clip-higher, e.g. 0.28); null = clip_eps."""
    ratio_level: Literal["token", "sequence"] = "token"
    """token: PPO's per-token ratio; sequence: GSPO's length-normalised sequence ratio (pair it with
    loss_agg seq_mean_token_mean and clip ranges of a few 1e-4)."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """How token losses become one number: token_mean (DAPO), seq_mean_token_mean (GRPO paper, GSPO),
    seq_mean_token_sum_norm (Dr. GRPO: token sums / rollout.max_tokens, no length normalisation)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop prompt groups whose rewards are all equal (no advantage signal),
    draw more prompts until `prompts_per_step` informative groups are found (at most
    `max_sampling_rounds` extra rounds; any shortfall is filled with dropped groups and counted)."""
    max_sampling_rounds: int = 4

    def __post_init__(self) -> None:
        a = "algo"
        check(self.n_samples >= 1, f"{a}.n_samples", f"must be >= 1, got {self.n_samples}")
        if self.algorithm in ("grpo", "rloo"):
            check(self.n_samples >= 2, f"{a}.n_samples",
                  f"{self.algorithm} needs at least 2 samples per prompt to form a baseline, got {self.n_samples}")
        check(self.prompts_per_step >= 1, f"{a}.prompts_per_step", "must be >= 1")
        check(self.epochs >= 1, f"{a}.epochs", "must be >= 1")
        check(self.minibatch_size >= 1, f"{a}.minibatch_size", "must be >= 1")
        check(self.batch_size % self.minibatch_size == 0, f"{a}.minibatch_size",
              f"must divide the rollout batch prompts_per_step * n_samples = {self.batch_size}, "
              f"got {self.minibatch_size}")
        check(0 < self.clip_eps < 1, f"{a}.clip_eps", f"must be in (0, 1), got {self.clip_eps}")
        check(self.value_clip is None or self.value_clip > 0, f"{a}.value_clip", "must be > 0 or null")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"{a}.gamma", "gamma and lam must be in [0, 1]")
        check(self.kl_coef >= 0, f"{a}.kl_coef", "must be >= 0")
        check(self.kl_target > 0 and self.kl_horizon > 0, f"{a}.kl_target", "kl_target and kl_horizon must be > 0")
        check(self.entropy_coef >= 0 and self.ptx_coef >= 0, f"{a}.entropy_coef",
              "entropy_coef and ptx_coef must be >= 0")
        check(self.tis_cap is None or self.tis_cap >= 1, f"{a}.tis_cap", f"must be >= 1 or null, got {self.tis_cap}")
        check(self.clip_eps_high is None or 0 < self.clip_eps_high < 10, f"{a}.clip_eps_high",
              f"must be in (0, 10) or null, got {self.clip_eps_high}")
        check(not self.dynamic_sampling or self.n_samples >= 2, f"{a}.dynamic_sampling",
              f"needs groups: algo.n_samples >= 2, got {self.n_samples}")
        check(self.critic_warmup >= 0, f"{a}.critic_warmup", f"must be >= 0, got {self.critic_warmup}")
        check(self.critic_warmup == 0 or self.algorithm == "ppo", f"{a}.critic_warmup",
              f"{self.algorithm} has no critic to warm up")
        check(self.max_sampling_rounds >= 1, f"{a}.max_sampling_rounds",
              f"must be >= 1, got {self.max_sampling_rounds}")

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.n_samples

    @property
    def uses_critic(self) -> bool:
        return self.algorithm == "ppo"

    @property
    def kl_to_reward(self) -> bool:
        return self.kl_in_reward if self.kl_in_reward is not None else self.algorithm != "grpo"


def compute_advantages(batch: "RLBatch", cfg: AlgoConfig, kl_coef: float) -> tuple["RLBatch", dict[str, float]]:
    """Fill `token_rewards`, `advantages` and `returns`; return stats (KL, reward) for logging."""
    import torch

    from llmray.rl.ppo.advantages import (broadcast_to_tokens, gae, group_advantages, kl_shaped_rewards,
                                          masked_mean, rloo_advantages, whiten)
    from llmray.rl.ppo.kl import kl_estimate

    mask = batch.train_mask
    scores = batch.scores.float()
    if batch.ref_logprobs is not None:
        kl = kl_estimate(batch.logprobs, batch.ref_logprobs, cfg.kl_estimator) * mask
    else:
        kl = torch.zeros_like(mask)
    seq_kl = kl.sum(-1)  # KL of the whole response, what the adaptive controller tracks
    beta = kl_coef if cfg.kl_to_reward else 0.0
    token_rewards = kl_shaped_rewards(scores, kl, mask, beta)
    if cfg.algorithm == "ppo":
        if batch.values is None:
            raise ValueError("ppo needs critic values in the batch")
        adv, returns = gae(token_rewards, batch.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, mask)
    else:
        # Sequence-level: the KL-shaped return of each response (= score when the KL is in the loss).
        seq_return = token_rewards.sum(-1)
        if cfg.algorithm == "grpo":
            seq_adv = group_advantages(seq_return, cfg.n_samples, cfg.grpo_normalize_std)
        else:
            seq_adv = rloo_advantages(seq_return, cfg.n_samples)
        adv = broadcast_to_tokens(seq_adv, mask)
        returns = broadcast_to_tokens(seq_return, mask)
    stats = {
        "kl/seq_mean": float(seq_kl.mean()),
        "kl/token_mean": float(masked_mean(kl, mask)),
        "kl/coef": float(kl_coef),
        "rollout/score_mean": float(scores.mean()),
        "rollout/shaped_return_mean": float(token_rewards.sum(-1).mean()),
        "rollout/advantage_abs_mean": float(masked_mean(adv.abs(), mask)),
    }
    return batch.replace(token_rewards=token_rewards, advantages=adv, returns=returns), stats


def informative_groups(scores: "torch.Tensor", group_size: int, tol: float = 1e-6) -> list[int]:
    """DAPO's filter: the indices of the prompt groups (prompt-major rows of `group_size`) whose rewards
    are not all equal. A group of equal rewards has zero group-relative advantage: it adds tokens to the
    batch but no gradient signal."""
    g = scores.float().view(-1, group_size)
    spread = g.max(dim=1).values - g.min(dim=1).values
    return [i for i, s in enumerate(spread.tolist()) if s > tol]


def group_rows(groups: list[int], group_size: int) -> list[int]:
    """Row indices of whole prompt groups, in the given group order."""
    return [g * group_size + j for g in groups for j in range(group_size)]
