"""RL prompt data: read {"prompt": [messages], "answer"} records, check them, tokenize with the chat template."""

from __future__ import annotations

import json
import random
from pathlib import Path

from llmray.errors import UserError


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if files:
            return files
    raise UserError(f"prompts: no JSONL file at {path}")


def resolve_split(path: str, split: str) -> Path:
    """`path` itself, or `path`/`split` when `path` is a corpus artifact holding that split."""
    p = Path(path)
    if (p / split).is_dir() and not list(p.glob("*.jsonl")):
        return p / split
    return p


def read_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    """Records with a non-empty `prompt` message list and an `answer`; errors name file and line."""
    out: list[dict] = []
    for f in _files(Path(path)):
        with f.open() as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{f}:{n}: not valid JSON ({e})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), list) or not rec["prompt"]:
                    raise UserError(f"{f}:{n}: field 'prompt' must be a non-empty list of messages")
                for m in rec["prompt"]:
                    if not isinstance(m, dict) or "role" not in m or "content" not in m:
                        raise UserError(f"{f}:{n}: each prompt message needs 'role' and 'content'")
                if "answer" not in rec:
                    raise UserError(f"{f}:{n}: field 'answer' is missing (the rule reward needs it)")
                out.append({"prompt": rec["prompt"], "answer": str(rec["answer"])})
                if limit and len(out) >= limit:
                    return out
    if not out:
        raise UserError(f"prompts: {path} holds no records")
    return out


def tokenize_prompts(records: list[dict], tokenizer, max_len: int) -> list[list[int]]:
    ids = []
    for i, r in enumerate(records):
        enc = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
        t = list(enc["input_ids"])
        if len(t) > max_len:
            raise UserError(f"prompt {i} has {len(t)} tokens; the limit is "
                            f"rollout.max_model_len - rollout.max_tokens = {max_len}")
        ids.append(t)
    return ids


class PromptStream:
    """Prompts in a seeded order, epoch after epoch; the position is the count consumed (checkpointed)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, k = divmod(pos, self.n)
            order = list(range(self.n))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            out.append(order[k])
        return out


def pass_rates(answers: list[str], responses: list[str], samples: int) -> list[float]:
    """Fraction of each prompt's `samples` consecutive responses that state its answer (the rule check)."""
    from llmray.data.tasks import is_correct

    if len(responses) != len(answers) * samples:
        raise ValueError(f"{len(responses)} responses for {len(answers)} prompts x {samples} samples")
    return [sum(is_correct(a, r) for r in responses[i * samples:(i + 1) * samples]) / samples
            for i, a in enumerate(answers)]


def select_by_pass_rate(indices: list[int], rates: list[float], min_pass: float, max_pass: float) -> list[int]:
    """The prompt indices whose pass rate lies in [min_pass, max_pass], in their given order."""
    return [i for i, r in zip(indices, rates) if min_pass <= r <= max_pass]


def read_ptx(path: str, tokenizer, max_len: int, limit: int = 512):
    """SFT chat records -> a padded (N, L) tensor of token ids for the PPO-ptx LM loss."""
    import torch

    rows = []
    for f in _files(Path(path)):
        for n, line in enumerate(f.open(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "messages" not in rec:
                raise UserError(f"{f}:{n}: ptx_data record needs 'messages'")
            ids = tokenizer.apply_chat_template(rec["messages"], tokenize=True, return_dict=True)["input_ids"][:max_len]
            rows.append(list(ids))
            if len(rows) >= limit:
                break
        if len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"ptx_data: {path} holds no records")
    L = max(len(r) for r in rows)
    out = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out
