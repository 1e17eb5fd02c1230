"""`llmray ls`, `llmray <stage> --config X.yaml [key.sub=value ...]` and `llmray plan --config X.yaml`
(a dry run: llmray/plan): the command line.

User errors (bad config, missing input) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from llmray import config as cfglib
from llmray import stages
from llmray.errors import UserError

EXIT_USER_ERROR = 2
# Flags with a name of their own: `llmray pipeline --from sft --until ppo`.
FLAG_ALIASES = {"from": "from_stage", "until": "until_stage"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmray",
        description="The whole life of a language model on Ray.",
        epilog="stages: " + ", ".join(stages.STAGES) + ".  `llmray ls` lists them with their configs; "
               "`llmray plan --config X.yaml [--cluster 2x8xH100-80GB]` prints what a config would place and run.",
    )
    p.add_argument("stage", help="a stage name, `ls`, or `plan`")
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--log-level", default="INFO")
    return p


def list_stages() -> str:
    lines = []
    for s in stages.STAGES.values():
        lines.append(f"{s.name:<14} {s.summary}")
        lines.append(f"{'':<14} job: {s.job}")
        for c in stages.shipped_configs(s):
            root = stages.repo_root()
            lines.append(f"{'':<14} config: {c.relative_to(root) if root else c}")
    return "\n".join(lines)


def run_stage(name: str, config_path: str | None, overrides: list[str]) -> dict:
    """Load the stage's config, start or join Ray when the stage needs it, run it."""
    stage = stages.get(name)
    cfg = cfglib.load(stage.config_class(), config_path, overrides)
    start = time.monotonic()
    result = stage.run_fn()(cfg)
    result = dict(result or {})
    result.setdefault("elapsed_s", round(time.monotonic() - start, 1))
    return result


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Stage-specific flags (e.g. `pipeline --from sft`) are passed through as key=value.
    args, unknown = _parser().parse_known_args(argv)
    _setup_logging(args.log_level)
    if args.stage in ("ls", "list"):
        print(list_stages())
        return 0
    if args.stage == "plan":
        return plan_main(args, unknown)
    try:
        overrides = list(args.overrides) + _flags_to_overrides(unknown)
        result = run_stage(args.stage, args.config, overrides)
    except UserError as e:
        print(f"llmray {args.stage}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"llmray {args.stage}: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2, default=str))
    return 0


PLAN_FLAGS = {"cluster": "local (default: this machine), a spec such as 2x8xH100-80GB, or a YAML file",
              "stage": "the stage, when the config is not under jobs/configs/<stage>/",
              "model-preset": "a model preset (tiny, small, base, 1b, 7b) for the memory estimate when the "
                              "config's model directory does not exist yet",
              "json": "print the plan as JSON"}


def plan_main(args: argparse.Namespace, unknown: list[str]) -> int:
    """`llmray plan --config X [--cluster SPEC] [--stage S] [--model-preset P] [--json] [key=value ...]`."""
    from llmray.plan import make_plan, render, to_json

    p = argparse.ArgumentParser(prog="llmray plan")
    for flag, text in PLAN_FLAGS.items():
        p.add_argument(f"--{flag}", help=text, **({"action": "store_true"} if flag == "json" else {}))
    opts, rest = p.parse_known_args(unknown)
    try:
        plan = make_plan(args.config, opts.stage, opts.cluster, list(args.overrides) + _flags_to_overrides(rest),
                         opts.model_preset)
    except UserError as e:
        print(f"llmray plan: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(json.dumps(to_json(plan), indent=2, default=str) if opts.json else render(plan))
    return 0


def _flags_to_overrides(unknown: list[str]) -> list[str]:
    """`--from sft --keep-serving --model=/m` -> `from_stage=sft keep_serving=true model=/m`."""
    out, i = [], 0
    while i < len(unknown):
        tok = unknown[i]
        if not tok.startswith("--"):
            if "=" not in tok:
                raise UserError(f"unexpected argument {tok!r}; overrides look like key.sub=value")
            out.append(tok)
            i += 1
            continue
        name, eq, value = tok[2:].partition("=")
        key = FLAG_ALIASES.get(name, name.replace("-", "_"))
        nxt = unknown[i + 1] if i + 1 < len(unknown) else None
        if eq:
            out.append(f"{key}={value}")
        elif nxt is not None and not nxt.startswith("--") and "=" not in nxt:
            out.append(f"{key}={nxt}")
            i += 1
        else:
            out.append(f"{key}=true")
        i += 1
    return out


def job_main(stage_name: str) -> None:
    """Entry point of `jobs/<stage>.py`: same arguments as `llmray <stage>`."""
    sys.exit(main([stage_name, *sys.argv[1:]]))


def config_path_for(stage_name: str, name: str) -> Path:
    """Path of a shipped config, e.g. config_path_for("pretrain", "tiny_cpu")."""
    root = stages.repo_root()
    if root is None:
        raise UserError("cannot find jobs/configs (run from the llmray checkout)")
    return root / stages.get(stage_name).config_dir / f"{name}.yaml"


if __name__ == "__main__":
    sys.exit(main())
