"""RLBatch: the one typed object that crosses processes in the RL loop.

Rows are (prompt, response) samples, prompt-major (the n samples of a prompt are adjacent).
Prompts are LEFT-padded and responses RIGHT-padded, so every response starts at the same column
and all per-token tensors are (B, T) over response tokens. Roles fill in fields as the step goes:
rollout -> `response_ids`, `rollout_logprobs`; reward -> `scores`; ref -> `ref_logprobs`;
critic -> `values`; actor -> `logprobs`; the controller -> `advantages`, `returns`.
`split(n)` / `concat` are what the worker groups' split dispatch uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Which side each padded tensor is padded on when shards of different widths are joined.
_PROMPT_FIELDS = ("prompt_ids", "prompt_mask")
_TOKEN_FIELDS = ("response_ids", "response_mask", "rollout_logprobs", "logprobs", "ref_logprobs",
                 "values", "token_rewards", "advantages", "returns", "token_versions", "loss_mask")
_ROW_FIELDS = ("prompt_index", "scores", "correct", "env_rewards", "turns", "tool_calls")
_LIST_FIELDS = ("answers", "texts", "finish_reasons")


@dataclass
class RLBatch:
    prompt_ids: "torch.Tensor"
    """(B, P) int64, left-padded with the pad id."""
    prompt_mask: "torch.Tensor"
    """(B, P) 1 on real prompt tokens."""
    response_ids: "torch.Tensor"
    """(B, T) int64, right-padded (EOS, when generated, is the last real token)."""
    response_mask: "torch.Tensor"
    """(B, T) float 1 on real response tokens."""
    prompt_index: "torch.Tensor"
    """(B,) int64 global index of the prompt each row answers (its GRPO/RLOO group)."""
    answers: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    rollout_logprobs: "torch.Tensor | None" = None
    """(B, T) log-probs the rollout engine (vLLM) reported for the sampled tokens."""
    logprobs: "torch.Tensor | None" = None
    """(B, T) log-probs of the actor before this step's update (PPO's pi_old)."""
    ref_logprobs: "torch.Tensor | None" = None
    values: "torch.Tensor | None" = None
    scores: "torch.Tensor | None" = None
    """(B,) sequence reward from the reward role."""
    correct: "torch.Tensor | None" = None
    """(B,) 1.0 where the response states the gold answer (task accuracy), from the reward role."""
    token_rewards: "torch.Tensor | None" = None
    advantages: "torch.Tensor | None" = None
    returns: "torch.Tensor | None" = None
    loss_mask: "torch.Tensor | None" = None
    """(B, T) float 1 on the tokens the policy generated; 0 on tool outputs a multi-turn episode put
    in the context (they count for attention, not for the loss or the KL). None: `response_mask`."""
    env_rewards: "torch.Tensor | None" = None
    """(B,) the environment's reward of each episode (`llmray.rl.env`): the rule part of the reward."""
    token_versions: "torch.Tensor | None" = None
    """(B, T) int64: the weight version (pushes into the engines so far) that generated each response
    token; in async mode the trainer may be up to `rollout.max_staleness` versions ahead."""
    turns: "torch.Tensor | None" = None
    """(B,) float: the model's turns in each episode (multi-turn environments; None for single-turn rollouts)."""
    tool_calls: "torch.Tensor | None" = None
    """(B,) float: the tool calls each episode made."""

    # ----- shape helpers
    def __len__(self) -> int:
        return int(self.response_ids.size(0))

    @property
    def train_mask(self) -> "torch.Tensor":
        """The tokens that count for the loss, the KL and the advantages: the policy's own."""
        return self.response_mask if self.loss_mask is None else self.loss_mask

    @property
    def input_ids(self) -> "torch.Tensor":
        import torch

        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> "torch.Tensor":
        import torch

        return torch.cat([self.prompt_mask.long(), self.response_mask.long()], dim=1)

    @property
    def position_ids(self) -> "torch.Tensor":
        """Positions that start at 0 on the first real prompt token (left padding is skipped), as
        in the rollout engine, which sees unpadded prompts."""
        am = self.attention_mask
        return (am.cumsum(-1) - 1).clamp(min=0)

    def replace(self, **changes: Any) -> "RLBatch":
        return dataclasses.replace(self, **changes)

    def to(self, device: "torch.device | str") -> "RLBatch":
        """The batch with every tensor on `device` (a role's device, llmray.device). A tensor already there
        is kept as it is, so on the CPU this copies nothing."""
        changes = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                   if f.name not in _LIST_FIELDS and getattr(self, f.name) is not None}
        return dataclasses.replace(self, **changes)

    # ----- dispatch
    def select(self, idx: "torch.Tensor | list[int]") -> "RLBatch":
        import torch

        idx_t = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif f.name in _LIST_FIELDS:
                out[f.name] = [v[i] for i in idx_t.tolist()] if v else []
            else:
                out[f.name] = v.index_select(0, idx_t.to(v.device))
        return RLBatch(**out)

    def split(self, n: int) -> list["RLBatch"]:
        """n contiguous shards whose sizes differ by at most one (prompt groups stay together
        when the batch size is a multiple of n * group size)."""
        if n < 1:
            raise ValueError(f"cannot split into {n} shards")
        size, rest = divmod(len(self), n)
        shards, start = [], 0
        for i in range(n):
            end = start + size + (1 if i < rest else 0)
            shards.append(self.select(list(range(start, end))))
            start = end
        return shards

    @staticmethod
    def concat(batches: list["RLBatch"]) -> "RLBatch":
        """Join shards, re-padding prompts on the left and responses on the right to one width."""
        import torch

        if not batches:
            raise ValueError("nothing to concatenate")
        out: dict[str, Any] = {}
        for f in dataclasses.fields(RLBatch):
            vals = [getattr(b, f.name) for b in batches]
            if f.name in _LIST_FIELDS:
                out[f.name] = [x for v in vals for x in (v or [])]
                continue
            if any(v is None for v in vals):
                if not all(v is None for v in vals):
                    raise ValueError(f"field {f.name} is set on some shards and not on others")
                out[f.name] = None
                continue
            if f.name in _ROW_FIELDS:
                out[f.name] = torch.cat(vals, 0)
                continue
            width = max(v.size(1) for v in vals)
            pad_value = 0
            left = f.name in _PROMPT_FIELDS
            padded = []
            for v in vals:
                gap = width - v.size(1)
                if gap:
                    pad = torch.full((v.size(0), gap), pad_value, dtype=v.dtype, device=v.device)
                    v = torch.cat([pad, v] if left else [v, pad], 1)
                padded.append(v)
            out[f.name] = torch.cat(padded, 0)
        return RLBatch(**out)

    def chunks(self, size: int) -> list["RLBatch"]:
        """Consecutive pieces of at most `size` rows (micro-batches for a forward pass)."""
        return [self.select(list(range(i, min(i + size, len(self))))) for i in range(0, len(self), size)]

    def minibatches(self, size: int, seed: int) -> list["RLBatch"]:
        """Shuffled minibatches of `size` rows (the last may be smaller)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        return [self.select(perm[i:i + size]) for i in range(0, len(self), size)]

    @staticmethod
    def from_rollouts(rollouts: list[dict], answers: list[str], pad_id: int, prompt_offset: int = 0,
                      version: int = 0) -> "RLBatch":
        """Build a batch from rollout records ({"prompt_index","prompt_ids","response_ids",
        "logprobs","text","finish_reason"}); `answers[i]` is the gold answer of prompt i; `version`
        is the weight version the engines generated them with."""
        import torch

        B = len(rollouts)
        if B == 0:
            raise ValueError("no rollouts")
        P = max(len(r["prompt_ids"]) for r in rollouts)
        T = max(1, max(len(r["response_ids"]) for r in rollouts))
        prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros(B, P, dtype=torch.long)
        response_ids = torch.full((B, T), pad_id, dtype=torch.long)
        response_mask = torch.zeros(B, T)
        logprobs = torch.zeros(B, T)
        versions = torch.full((B, T), int(version), dtype=torch.long)
        multi = any("loss_mask" in r for r in rollouts)
        loss_mask = torch.zeros(B, T) if multi else None
        for i, r in enumerate(rollouts):
            p, resp = list(r["prompt_ids"]), list(r["response_ids"])
            if p:
                prompt_ids[i, P - len(p):] = torch.tensor(p)
                prompt_mask[i, P - len(p):] = 1
            if resp:
                response_ids[i, :len(resp)] = torch.tensor(resp)
                response_mask[i, :len(resp)] = 1
                lp = r.get("logprobs")
                if lp is not None:
                    logprobs[i, :len(resp)] = torch.tensor([float(x) for x in lp])
                if loss_mask is not None:
                    loss_mask[i, :len(resp)] = torch.tensor([float(x) for x in r.get("loss_mask", [1] * len(resp))])
                if "token_versions" in r:
                    versions[i, :len(resp)] = torch.tensor([int(x) for x in r["token_versions"]])
        idx = [int(r["prompt_index"]) + prompt_offset for r in rollouts]
        return RLBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
            response_mask=response_mask, prompt_index=torch.tensor(idx, dtype=torch.long),
            answers=[answers[int(r["prompt_index"])] for r in rollouts],
            texts=[r.get("text", "") for r in rollouts],
            finish_reasons=[r.get("finish_reason") or "" for r in rollouts],
            rollout_logprobs=logprobs,
            loss_mask=loss_mask,
            env_rewards=_row_values(rollouts, "env_reward"),
            token_versions=versions,
            turns=_row_values(rollouts, "turns"),
            tool_calls=_row_values(rollouts, "tool_calls"),
        )


def _row_values(rollouts: list[dict], key: str) -> "torch.Tensor | None":
    """(B,) float tensor of a per-episode value (`env_reward`, `turns`, `tool_calls`), or None if a record lacks it."""
    import torch

    return torch.tensor([float(r[key]) for r in rollouts]) if all(key in r for r in rollouts) else None
