"""PPO losses: clipped surrogate (with optional truncated importance sampling, a decoupled upper
clip, GSPO's sequence-level ratio and a choice of loss aggregation), clipped value loss, entropy.
Pure tensor functions over (B, T) response tokens with a 0/1 mask.

Clipped surrogate and value clipping: Schulman et al. 2017 (PPO) as used for LLMs by Ziegler et
al. 2019 and Ouyang et al. 2022. Truncated importance sampling for the train-inference gap
(vLLM's sampling distribution differs slightly from the trainer's): Espeholt et al. 2018
(IMPALA's truncated rho) as applied to LLM RL by Yao et al. 2025 ("Your efficient RL framework
secretly brings you off-policy RL training"). Clip-higher and token-mean aggregation: Yu et al. 2025
(DAPO). Sequence-level ratio: Zheng et al. 2025 (GSPO). Constant-length normalisation: Liu et al.
2025 (Dr. GRPO, "Understanding R1-Zero-like training").
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


def sequence_ratio_logits(logprobs: "torch.Tensor", old_logprobs: "torch.Tensor",
                          mask: "torch.Tensor") -> "torch.Tensor":
    """GSPO's per-token log-ratio: every token of sequence i carries log s_i = mean_t log(pi/pi_old)
    (the length-normalised sequence ratio) as its value, while its gradient is that of its own
    log pi(y_t) (GSPO-token: s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)])."""
    from llmray.rl.ppo.advantages import masked_mean

    seq = masked_mean((logprobs - old_logprobs).detach(), mask, dim=-1)
    return seq[:, None] + logprobs - logprobs.detach()


def aggregate(per_token: "torch.Tensor", mask: "torch.Tensor", how: str = "token_mean",
              norm_len: int | None = None) -> "torch.Tensor":
    """Reduce (B, T) per-token losses to a scalar.

    token_mean: sum over every real token / their count (DAPO; long responses weigh more).
    seq_mean_token_mean: each sequence's token mean, then the mean over sequences (GRPO's paper, GSPO).
    seq_mean_token_sum_norm: each sequence's token sum / a constant `norm_len` (the response cap),
    then the mean over sequences (Dr. GRPO: no per-response length normalisation).
    """
    if how == "token_mean":
        return masked_mean(per_token, mask)
    m = mask.to(per_token.dtype)
    if how == "seq_mean_token_mean":
        return masked_mean(per_token, mask, dim=-1).mean()
    if how == "seq_mean_token_sum_norm":
        if not norm_len or norm_len < 1:
            raise ValueError(f"seq_mean_token_sum_norm needs norm_len >= 1, got {norm_len}")
        return ((per_token * m).sum(-1) / norm_len).mean()
    raise ValueError(f"loss aggregation must be token_mean, seq_mean_token_mean or seq_mean_token_sum_norm, "
                     f"got {how!r}")


def policy_loss(
    logprobs: "torch.Tensor",
    old_logprobs: "torch.Tensor",
    advantages: "torch.Tensor",
    mask: "torch.Tensor",
    clip_eps: float = 0.2,
    is_weights: "torch.Tensor | None" = None,
    clip_eps_high: float | None = None,
    ratio_level: str = "token",
    loss_agg: str = "token_mean",
    norm_len: int | None = None,
) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
    """PPO clipped surrogate: -E[min(rho * A, clip(rho, 1-eps_low, 1+eps_high) * A)], rho = pi / pi_old.

    `clip_eps_high` decouples the upper clip bound (DAPO's clip-higher; None = `clip_eps`).
    `ratio_level="sequence"` uses GSPO's length-normalised sequence ratio for every token of a
    response (`sequence_ratio_logits`). `is_weights` (from `tis_weights`) multiply each token's
    term. `loss_agg`/`norm_len`: see `aggregate`. Returns (loss, stats) with `clip_frac` (share of
    tokens where the clipped branch is active) and `approx_kl` (k3 of pi_old vs pi, a step-size
    monitor, always per token).
    """
    import torch

    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"ratio_level must be token or sequence, got {ratio_level!r}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    token_log_ratio = logprobs - old_logprobs
    log_ratio = token_log_ratio if ratio_level == "token" else sequence_ratio_logits(logprobs, old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * advantages
    per_token = -torch.min(surr1, surr2)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = aggregate(per_token, mask, loss_agg, norm_len)
    with torch.no_grad():
        clip_frac = masked_mean((surr2 < surr1).float(), mask)
        approx_kl = masked_mean(torch.exp(-token_log_ratio) - 1.0 + token_log_ratio, mask)
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
