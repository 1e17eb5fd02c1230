"""Advantages for PPO (GAE over KL-shaped token rewards) and for GRPO/RLOO (group baselines).

Pure tensor functions: no Ray, no DeepSpeed. Per-token tensors are (B, T) over the response
tokens, right-padded; `mask` is 1 on real response tokens. References: GAE — Schulman et al. 2016
("High-Dimensional Continuous Control Using Generalized Advantage Estimation"); the KL-shaped
reward — Ziegler et al. 2019 and Ouyang et al. 2022 (InstructGPT); GRPO — Shao et al. 2024
(DeepSeekMath); RLOO — Ahmadian et al. 2024 ("Back to Basics"), after Kool et al. 2019.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def masked_mean(x: "torch.Tensor", mask: "torch.Tensor", dim: int | None = None) -> "torch.Tensor":
    """Mean of `x` over positions where `mask` is 1 (a zero mask gives 0, not NaN)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: "torch.Tensor", mask: "torch.Tensor", unbiased: bool = True) -> "torch.Tensor":
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: "torch.Tensor", mask: "torch.Tensor", shift_mean: bool = True, eps: float = 1e-8) -> "torch.Tensor":
    """(x - mean) / std over masked positions; padding stays 0. `shift_mean=False` only rescales."""
    import torch

    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def last_token_index(mask: "torch.Tensor") -> "torch.Tensor":
    """Index of the rightmost 1 of each row (0 for an empty row); masks may have holes (tool outputs
    inside a multi-turn response)."""
    m = mask.long()
    idx = m.size(-1) - 1 - m.flip(-1).argmax(-1)
    return idx * (m.sum(-1) > 0).long()


def kl_shaped_rewards(
    scores: "torch.Tensor",
    kl: "torch.Tensor",
    mask: "torch.Tensor",
    kl_coef: float,
) -> "torch.Tensor":
    """Per-token rewards r_t = -kl_coef * KL_t, plus the sequence score on the last response token.

    This is InstructGPT's r(x, y) - beta * log(pi/pi_ref), spread over tokens: the KL term is a
    per-token penalty and the reward model's score arrives once, when the response ends.
    """
    import torch

    rewards = -kl_coef * kl * mask.to(kl.dtype)
    idx = last_token_index(mask)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.size(0)), idx] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: "torch.Tensor",
    values: "torch.Tensor",
    mask: "torch.Tensor",
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Generalised advantage estimation over right-padded responses -> (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V after the last real token = 0 (the episode ends
    with the response); A_t = delta_t + gamma * lam * A_{t+1}. Returns = A + V (the critic target).
    """
    import torch

    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    T = rewards.size(1)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    # Reverse scan: A_t depends on A_{t+1}. Padding positions carry no value and reset the scan,
    # so the token after the last real one contributes V = 0 and A = 0.
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    returns = (adv + values) * m
    return adv, returns


def _groups(scores: "torch.Tensor", group_size: int) -> "torch.Tensor":
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    # Rollouts are prompt-major: the n samples of prompt i are rows i*n .. i*n+n-1.
    return scores.view(-1, group_size)


def group_advantages(
    scores: "torch.Tensor", group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> "torch.Tensor":
    """GRPO: A_i = (r_i - mean(group)) / (std(group) + eps), or without the std division
    (Dr. GRPO; Liu et al. 2025). One advantage per sequence, broadcast over its tokens by the caller."""
    g = _groups(scores.float(), group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(scores: "torch.Tensor", group_size: int) -> "torch.Tensor":
    """RLOO: A_i = r_i - mean_{j != i} r_j  (= n/(n-1) * (r_i - mean(group)))."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt for a leave-one-out baseline")
    g = _groups(scores.float(), group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def broadcast_to_tokens(seq_adv: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    """(B,) sequence advantages -> (B, T) token advantages on real tokens."""
    return seq_adv[:, None].to(mask.dtype if mask.is_floating_point() else seq_adv.dtype) * mask.to(seq_adv.dtype)
