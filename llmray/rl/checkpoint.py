"""RL checkpoints: the actor's and critic's engine states, then COMPLETE.json (the controller state) written last.

    path = save(roles, step, {"algorithm": "ppo", "kl": kl_ctl.state_dict(), "prompts_consumed": 64})
    step, kl_ctl, consumed = restore(roles, path)   # engine states back; KL controller, prompt cursor from the marker

Layout `run_dir`/checkpoints/step_00000008/{actor/, critic/, COMPLETE.json}; a directory without the
marker is incomplete and never resumed from. `checkpoint.keep_last` complete ones are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from llmray.errors import UserError

if TYPE_CHECKING:
    from llmray.rl.algorithms import AlgoConfig
    from llmray.rl.groups import RoleGroups


def root(roles: "RoleGroups") -> Path:
    """Where the run's RL checkpoints live."""
    return Path(roles.cfg.run_dir) / "checkpoints"


def save(roles: "RoleGroups", step: int, state: dict) -> Path:
    """actor/ and critic/ engine states, then COMPLETE.json ({"step": step, **state}) written last."""
    import shutil
    import uuid

    from llmray.train.checkpoint import MARKER, retain, step_dir

    path = step_dir(root(roles), step)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    roles.groups["actor"].save_checkpoint(str(path / "actor"))
    if "critic" in roles.groups:
        roles.groups["critic"].save_checkpoint(str(path / "critic"))
    tmp = path / f".{MARKER}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps({"step": step, **state}, indent=2))
    os.replace(tmp, path / MARKER)
    retain(root(roles), roles.cfg.checkpoint.keep_last)
    return path


def load(roles: "RoleGroups", path: Path) -> dict:
    """The actor's and critic's engine states from `path`; returns its COMPLETE.json."""
    from llmray.train.checkpoint import read_meta

    algorithm = roles.cfg.algo.algorithm
    meta = read_meta(path)
    if meta.get("algorithm") != algorithm:
        raise UserError(f"checkpoint {path} is from a {meta.get('algorithm')} run but algo.algorithm is "
                        f"{algorithm}; use another run_dir or checkpoint.resume=never")
    roles.groups["actor"].load_checkpoint(str(path / "actor"))
    if "critic" in roles.groups:
        roles.groups["critic"].load_checkpoint(str(path / "critic"))
    return meta


def kl_controller(algo: "AlgoConfig", state: dict | None = None):
    """The KL-coefficient controller of `algo`, fresh or restored from a checkpoint's `state_dict()`."""
    from llmray.rl.ppo.kl import make_kl_controller

    return make_kl_controller(algo.kl_controller, algo.kl_coef, algo.kl_target, algo.kl_horizon, state=state)


def restore(roles: "RoleGroups", path: Path):
    """Load the checkpoint at `path`: returns (its step, the KL controller as it was then, the prompts
    consumed by then)."""
    meta = load(roles, path)
    step = int(meta["step"])
    consumed = int(meta.get("prompts_consumed", step * roles.cfg.algo.prompts_per_step))
    return step, kl_controller(roles.cfg.algo, state=meta["kl"]), consumed
