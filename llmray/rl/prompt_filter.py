"""The pass-rate prompt filter: train only on prompts the starting policy sometimes, but not always, solves.

    kept, summary = filter_prompts(roles, prompt_ids, records, tokenizer, resuming=latest is not None)

Runs before any update, so the engines still hold the starting policy. The kept list is saved in
`run_dir`/prompt_filter.json; a resumed run reuses it instead of sampling again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from llmray.errors import UserError

if TYPE_CHECKING:
    from llmray.rl.groups import RoleGroups

log = logging.getLogger(__name__)


def filter_prompts(roles: "RoleGroups", prompt_ids: list[list[int]], records: list[dict], tokenizer,
                   resuming: bool) -> tuple[list[int], dict]:
    """The indices of the prompts to train on (see PromptFilterConfig), and the filter's summary
    (pool, kept, never/always solved, ...)."""
    from llmray.rl import data
    from llmray.rl.evaluate import texts

    cfg = roles.cfg
    f = cfg.prompt_filter
    path = Path(cfg.run_dir) / "prompt_filter.json"
    if resuming and path.is_file():
        saved = json.loads(path.read_text())
        log.info("prompt filter: reusing %s (%d prompts)", path, len(saved["kept_indices"]))
        return saved["kept_indices"], {k: v for k, v in saved.items() if k not in ("kept_indices", "pass_rates")}
    t = time.monotonic()
    pool = data.PromptStream(len(records), cfg.seed).indices(0, min(f.pool or len(records), len(records)))
    answers = [records[i]["answer"] for i in pool]
    sampling = {"n": f.samples, "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                "max_tokens": cfg.rollout.max_tokens}
    responses = texts(roles, [prompt_ids[i] for i in pool], sampling, tokenizer, answers)
    rates = data.pass_rates(answers, responses, f.samples)
    kept = data.select_by_pass_rate(pool, rates, f.min_pass, f.max_pass)
    summary = {"pool": len(pool), "kept": len(kept), "never_solved": sum(r == 0 for r in rates),
               "always_solved": sum(r == 1 for r in rates), "samples": f.samples, "min_pass": f.min_pass,
               "max_pass": f.max_pass, "seconds": round(time.monotonic() - t, 1)}
    path.write_text(json.dumps({**summary, "kept_indices": kept, "pass_rates": dict(zip(pool, rates))}))
    print(f"[llmray] prompt filter: kept {len(kept)} of {len(pool)} prompts with a pass rate in "
          f"[{f.min_pass}, {f.max_pass}] over {f.samples} samples ({summary['never_solved']} never solved, "
          f"{summary['always_solved']} always) in {summary['seconds']:.0f}s", flush=True)
    if not kept:
        raise UserError(f"prompt_filter: none of the {len(pool)} prompts examined has a pass rate in "
                        f"[{f.min_pass}, {f.max_pass}] ({summary['never_solved']} never solved, "
                        f"{summary['always_solved']} always); widen prompt_filter.min_pass / max_pass, raise "
                        "prompt_filter.pool, or set prompt_filter.enabled=false")
    return kept, summary
