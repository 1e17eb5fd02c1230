"""RL environments: what a rollout talks to. A single-turn task is the one-step case of the same loop.

    env = make_env(record, "calculator")              # one per episode (prompt x sample); `rollout.env`
    messages = env.reset(record["prompt"])            # the chat the model starts from
    observation, reward, done = env.step(assistant_text)
    # observation: messages to append (tool results) before the model's next turn; [] when done

`TaskEnv` is the arithmetic/instruction task of `llmray.data.tasks`: the episode ends at the first
assistant turn without a tool call, rewarded by the task's rule (`tasks.reward`). With `tools=True`
a system message offers a `calculator` tool; a turn with tool calls (the chat template's hermes
format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as llmray's server parses them)
gets the tool results as `tool` messages and the model continues. A turn that only calls tools
earns nothing by itself; if `rollout.max_turns` runs out first, the episode's reward is 0.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from typing import Protocol

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

CALCULATOR_SPEC = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with integers, + - * / and parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]},
    },
}
SYSTEM_TOOLS = ("You may call a tool by writing <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>. "
                "Tools: " + json.dumps([CALCULATOR_SPEC["function"]]))


class Env(Protocol):
    def reset(self, prompt: list[dict]) -> list[dict]:
        """The messages of the episode's first prompt."""

    def step(self, assistant_text: str) -> tuple[list[dict], float, bool]:
        """(observation messages, reward, done) after one assistant turn."""


def parse_tool_calls(text: str) -> list[dict]:
    """Tool calls in an assistant turn: [{"name", "arguments"}] or, for a call that does not parse,
    {"error": why} (answered to the model as a tool error, not raised)."""
    calls = []
    for body in TOOL_CALL_RE.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append({"error": f"tool call is not JSON: {e.msg}"})
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append({"error": "tool call needs a string \"name\""})
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                calls.append({"error": "tool call arguments are not a JSON object"})
                continue
        calls.append({"name": obj["name"], "arguments": args if isinstance(args, dict) else {}})
    return calls


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Evaluate + - * / and parentheses over numbers (no names, no calls); an error message otherwise."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers, + - * / and parentheses are allowed")

    if len(expression) > 200:
        return "error: expression longer than 200 characters"
    try:
        value = ev(ast.parse(expression, mode="eval").body)
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError) as e:
        return f"error: {e}"
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


class TaskEnv:
    """One episode of a task record {"prompt", "answer"}; the calculator tool when `tools`."""

    def __init__(self, answer: str, tools: bool = False):
        self.answer, self.tools = answer, tools
        self.tool_calls = 0

    def reset(self, prompt: list[dict]) -> list[dict]:
        if not self.tools:
            return list(prompt)
        return [{"role": "system", "content": SYSTEM_TOOLS}, *prompt]

    def step(self, assistant_text: str) -> tuple[list[dict], float, bool]:
        from llmray.data.tasks import reward

        calls = parse_tool_calls(assistant_text) if self.tools else []
        if not calls:
            return [], reward(self.answer, assistant_text), True
        self.tool_calls += len(calls)
        return [{"role": "tool", "content": self._run(c)} for c in calls], 0.0, False

    @staticmethod
    def _run(call: dict) -> str:
        if "error" in call:
            return f"error: {call['error']}"
        if call["name"] != "calculator":
            return f"error: unknown tool {call['name']!r}; tools: calculator"
        expr = call["arguments"].get("expression")
        return calculator(expr) if isinstance(expr, str) else "error: calculator needs {\"expression\": string}"


ENVS = ("task", "calculator")


def make_env(record: dict, env: str = "task") -> TaskEnv:
    """The environment `rollout.env` names for one episode of `record` ({"answer", ...})."""
    if env not in ENVS:
        raise ValueError(f"rollout.env must be one of {ENVS}, got {env!r}")
    return TaskEnv(str(record["answer"]), tools=env == "calculator")


def env_factories(answers: list[str], env: str) -> list:
    """Per prompt, a builder of a fresh environment (one per episode) for `llmray.rl.episodes`."""
    return [lambda a=a: make_env({"answer": a}, env) for a in answers]
