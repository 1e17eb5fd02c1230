"""RL health monitors, on by default: length drift, reward gain per unit of KL, and a reward-hacking
warning when the training reward rises while held-out accuracy falls.

    mon = Monitors()
    metrics.update(mon.on_step(step, metrics))    # monitor/length_drift, monitor/reward_gain, ...
    warning = mon.on_eval(step, accuracy)         # a sentence with the figures, or None

Pure bookkeeping over the step metrics the controller already logs (`rollout/logprob_gap`, the
train-inference gap, and `actor/clip_frac`, the share of clipped tokens, are logged by the step
itself); the recipe logs the warning and counts it in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BASELINE_STEPS = 3
"""Steps whose mean response length and reward are the run's baseline."""


@dataclass
class Monitors:
    hack_margin: float = 0.02
    """Reward rise and accuracy fall (absolute) that together count as a reward-hacking warning."""
    rewards: list[tuple[int, float]] = field(default_factory=list)
    lengths: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def on_step(self, step: int, metrics: dict) -> dict[str, float]:
        """Monitor figures for this step: response length over the baseline's, reward gain over the
        baseline's, and that gain per nat of sequence KL to the reference."""
        reward, length = float(metrics["rollout/reward_mean"]), float(metrics["rollout/response_length"])
        self.rewards.append((step, reward))
        self.lengths.append(length)
        base_len = _mean(self.lengths[:BASELINE_STEPS])
        gain = reward - _mean([r for _, r in self.rewards[:BASELINE_STEPS]])
        kl = float(metrics.get("kl/seq_mean", 0.0))
        out = {"monitor/length_drift": length / base_len if base_len > 0 else 1.0, "monitor/reward_gain": gain}
        if abs(kl) > 1e-6:
            out["monitor/reward_gain_per_kl"] = gain / kl
        return out

    def on_eval(self, step: int, accuracy: float) -> str | None:
        """Compare this held-out accuracy with the previous eval's, and the mean training reward of the
        steps since then with the steps before: a rise in one and a fall in the other is a warning."""
        prev = self.evals[-1] if self.evals else None
        self.evals.append((step, accuracy))
        if prev is None:
            return None
        p_step, p_acc = prev
        before = [r for s, r in self.rewards if s <= p_step][-max(1, step - p_step):]
        since = [r for s, r in self.rewards if p_step < s <= step]
        if not before or not since:
            return None
        r0, r1 = _mean(before), _mean(since)
        if r1 - r0 > self.hack_margin and p_acc - accuracy > self.hack_margin:
            msg = (f"possible reward hacking: training reward rose {r0:.3f} -> {r1:.3f} (steps {p_step} -> {step}) "
                   f"while held-out accuracy fell {p_acc:.3f} -> {accuracy:.3f}")
            self.warnings.append(msg)
            return msg
        return None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
