"""PPO losses: clipped surrogate (with optional truncated importance sampling), clipped value
loss, entropy. Pure tensor functions over (B, T) response tokens with a 0/1 mask.

Clipped surrogate and value clipping: Schulman et al. 2017 (PPO) as used for LLMs by Ziegler et
al. 2019 and Ouyang et al. 2022. Truncated importance sampling for the train-inference gap
(vLLM's sampling distribution differs slightly from the trainer's): Espeholt et al. 2018
(IMPALA's truncated rho) as applied to LLM RL by Yao et al. 2025 ("Your efficient RL framework
secretly brings you off-policy RL training").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmray.rl.ppo.advantages import masked_mean

if TYPE_CHECKING:
    import torch


def tis_weights(actor_logprobs: "torch.Tensor", rollout_logprobs: "torch.Tensor", cap: float) -> "torch.Tensor":
    """w_t = min(pi_actor(y_t) / pi_rollout(y_t), cap): the tokens were sampled by the rollout
    engine, not by the actor, so the on-policy gradient is reweighted, truncated at `cap` to
    bound its variance. No gradient flows through the weights."""
    import torch

    log_w = (actor_logprobs.float() - rollout_logprobs.float()).detach()
    return torch.clamp(torch.exp(torch.clamp(log_w, max=20.0)), max=cap)


def policy_loss(
    logprobs: "torch.Tensor",
    old_logprobs: "torch.Tensor",
    advantages: "torch.Tensor",
    mask: "torch.Tensor",
    clip_eps: float = 0.2,
    is_weights: "torch.Tensor | None" = None,
) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
    """PPO clipped surrogate: -E[min(rho * A, clip(rho, 1-eps, 1+eps) * A)], rho = pi / pi_old.

    `is_weights` (from `tis_weights`) multiply each token's term. Returns (loss, stats) with
    `clip_frac` (share of tokens where the clipped branch is active) and `approx_kl` (k3 of
    pi_old vs pi, a step-size monitor).
    """
    import torch

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.min(surr1, surr2)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clip_frac = masked_mean((surr2 < surr1).float(), mask)
        approx_kl = masked_mean(torch.exp(-log_ratio) - 1.0 + log_ratio, mask)
    return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}


def value_loss(
    values: "torch.Tensor",
    old_values: "torch.Tensor",
    returns: "torch.Tensor",
    mask: "torch.Tensor",
    clip_range: float | None = 0.2,
) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
    """0.5 * E[max((V - R)^2, (clip(V, V_old ± c) - R)^2)]; plain MSE when `clip_range` is None."""
    import torch

    err = (values - returns) ** 2
    if clip_range is None:
        loss = 0.5 * masked_mean(err, mask)
        return loss, {"clip_frac": torch.zeros(())}
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((err_clipped > err).float(), mask)
    return loss, {"clip_frac": clip_frac}


def entropy_from_logits(logits: "torch.Tensor") -> "torch.Tensor":
    """Per-position entropy of softmax(logits): logsumexp(z) - sum softmax(z) * z."""
    import torch

    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def token_logprobs(logits: "torch.Tensor", tokens: "torch.Tensor") -> "torch.Tensor":
    """log softmax(logits)[tokens] without materialising the full log-softmax twice."""
    import torch

    logits = logits.float()
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
