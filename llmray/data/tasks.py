"""Synthetic tasks with verifiable answers: arithmetic and simple instructions.

One place defines a task's prompt, its gold answer, the response format the model is taught in
SFT, how an answer is read back from a response, and the rule-based reward, so that the SFT data,
preference pairs, RL reward and evaluation can never disagree.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

ANSWER_PREFIX = "The answer is"
_ANSWER_RE = re.compile(r"The answer is\s+(-?[A-Za-z0-9]+)")
KINDS = ("add", "sub", "max", "repeat")


@dataclass(frozen=True)
class Task:
    kind: str
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False)

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]

    def gold_response(self) -> str:
        return f"{ANSWER_PREFIX} {self.answer}."


_WORDS = ("apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon", "maple", "orbit")


def make_task(rng: random.Random, kind: str | None = None, max_operand: int = 20) -> Task:
    """A task drawn from `rng`: `add`, `sub` and `max` over 0..max_operand, `repeat` a word."""
    kind = kind or rng.choice(KINDS)
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if kind == "add":
        return Task(kind, f"What is {a} plus {b}?", str(a + b), {"a": a, "b": b})
    if kind == "sub":
        a, b = max(a, b), min(a, b)
        return Task(kind, f"What is {a} minus {b}?", str(a - b), {"a": a, "b": b})
    if kind == "max":
        return Task(kind, f"Which is larger, {a} or {b}?", str(max(a, b)), {"a": a, "b": b})
    if kind == "repeat":
        w = rng.choice(_WORDS)
        return Task(kind, f"Say the word {w}.", w, {"word": w})
    raise ValueError(f"unknown task kind {kind!r}; kinds: {', '.join(KINDS)}")


def extract_answer(response: str) -> str | None:
    """The answer a response states (`The answer is X`), or None when it states none."""
    m = _ANSWER_RE.search(response)
    return m.group(1) if m else None


def reward(task_answer: str, response: str) -> float:
    """Rule-based reward: 1 for the right answer in the taught format, 0.1 for the format with a
    wrong answer (so that RL can tell a well-formed attempt from noise), 0 otherwise."""
    got = extract_answer(response)
    if got is None:
        return 0.0
    return 1.0 if got == task_answer else 0.1


def is_correct(task_answer: str, response: str) -> bool:
    return extract_answer(response) == task_answer


def wrong_answer(task: Task, rng: random.Random) -> str:
    """A plausible wrong answer, for rejected responses."""
    if task.kind == "repeat":
        return rng.choice([w for w in _WORDS if w != task.answer])
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    return str(int(task.answer) + delta)


def sft_record(task: Task) -> dict:
    return {"messages": [*task.messages(), {"role": "assistant", "content": task.gold_response()}],
            "answer": task.answer, "kind": task.kind}


def preference_record(task: Task, rng: random.Random) -> dict:
    return {
        "prompt": task.messages(),
        "chosen": task.gold_response(),
        "rejected": f"{ANSWER_PREFIX} {wrong_answer(task, rng)}.",
        "answer": task.answer,
        "kind": task.kind,
    }


def prompt_record(task: Task) -> dict:
    return {"prompt": task.messages(), "answer": task.answer, "kind": task.kind}


def spread_over_kinds(records: list[dict], n: int) -> list[dict]:
    """`n` records taken in file order, one of each task kind in turn (`KINDS` order, then any other
    kind), so a handful of demo prompts shows every kind instead of the first few records' kinds."""
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r.get("kind", ""), []).append(r)
    order = [k for k in KINDS if k in by_kind] + [k for k in by_kind if k not in KINDS]
    out: list[dict] = []
    while len(out) < min(n, len(records)):
        for k in order:
            if by_kind[k] and len(out) < n:
                out.append(by_kind[k].pop(0))
    return out
