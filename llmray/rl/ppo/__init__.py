"""PPO-family math for LLM RL (GAE, group baselines, clipped losses, KL): pure tensor functions, no Ray."""

from llmray.rl.ppo.advantages import (
    gae,
    group_advantages,
    kl_shaped_rewards,
    masked_mean,
    masked_var,
    rloo_advantages,
    whiten,
)
from llmray.rl.ppo.kl import AdaptiveKLController, FixedKLController, kl_estimate, make_kl_controller
from llmray.rl.ppo.losses import entropy_from_logits, policy_loss, tis_weights, value_loss

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "kl_estimate",
    "kl_shaped_rewards",
    "make_kl_controller",
    "masked_mean",
    "masked_var",
    "policy_loss",
    "rloo_advantages",
    "tis_weights",
    "value_loss",
    "whiten",
]
