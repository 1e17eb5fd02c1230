"""KL estimators between the policy and the reference, and the KL-coefficient controllers.

k1 = log p - log q (unbiased, can be negative per token); k2 = (log p - log q)^2 / 2; k3 =
exp(log q - log p) - (log q - log p) - 1 (unbiased, always >= 0, lower variance). Samples come
from the policy p. (J. Schulman, "Approximating KL Divergence", 2020.) The adaptive controller is
Ziegler et al. 2019: beta moves so the observed KL tracks a target over a horizon of samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: "torch.Tensor", ref_logprobs: "torch.Tensor", estimator: str = "k1") -> "torch.Tensor":
    """Per-token KL(policy || ref) estimate from sampled tokens' log-probs."""
    import torch

    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # Clamp so one token where the policy moved far does not overflow exp().
        r = torch.clamp(-log_ratio, -20.0, 20.0)
        return torch.exp(r) - r - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_samples: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"kind": "fixed", "value": self.value}


@dataclass
class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)  (Ziegler et al. 2019)."""

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_samples: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}


def make_kl_controller(kind: str, init_coef: float, target: float | None = None, horizon: float = 10000.0,
                       state: dict | None = None):
    """A controller from config, optionally restored from a checkpoint's `state_dict()`."""
    value = float(state["value"]) if state else init_coef
    if kind == "fixed":
        return FixedKLController(value)
    if kind == "adaptive":
        if target is None or target <= 0:
            raise ValueError("an adaptive KL controller needs target > 0")
        return AdaptiveKLController(value, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; allowed: fixed, adaptive")
