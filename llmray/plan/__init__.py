"""`llmray plan --config X [--cluster SPEC] [--model-preset NAME] [--json] [key=value ...]`: a dry run.

Prints what the stage would do on a described cluster, without starting Ray or touching hardware: the
placement (each worker's node, local rank, GPU and device), the memory estimate per worker, the exact
DeepSpeed config dicts and vLLM engine arguments, from the functions the stage itself calls. Fails
with a UserError naming the key when the plan cannot fit. The stage is the config's folder under
jobs/configs/ (or `--stage`); the cluster is described as in llmray/plan/cluster.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmray.errors import UserError
from llmray.placement import Node
from llmray.plan.recipes import StagePlan

TRAIN_STAGES = ("pretrain", "sft", "reward-model", "dpo")
DATA_STAGES = ("corpus", "clean-dedup", "tokenizer", "pack")


def stage_of(config_path: str | None, stage: str | None) -> str:
    """`--stage`, else the stage whose jobs/configs/<dir> holds the config."""
    from llmray import stages

    if stage:
        return stages.get(stage).name
    if config_path:
        folder = Path(config_path).resolve().parent.name
        for s in stages.STAGES.values():
            if Path(s.config_dir).name == folder:
                return s.name
    raise UserError(f"--stage: cannot tell the stage of {config_path!r} from its folder; pass --stage NAME")


def plan_stage(stage: str, cfg: Any, nodes: list[Node], preset: str | None = None) -> StagePlan:
    from llmray.plan import recipes

    if stage in TRAIN_STAGES:
        return recipes.plan_train(stage, cfg, nodes, preset)
    if stage == "ppo":
        return recipes.plan_rl(cfg, nodes, preset)
    if stage == "serve":
        return recipes.plan_serve(cfg, nodes)
    if stage == "quantize":
        return recipes.plan_driver_only(stage, cfg)
    if stage == "pipeline":
        from llmray.stages.pipeline import stage_configs

        p = StagePlan("pipeline", "")
        p.parts = [plan_stage(name, c, nodes, preset) for name, c in stage_configs(cfg).items()]
        return p
    return recipes.plan_data(stage, cfg)


def make_plan(config_path: str | None, stage: str | None = None, cluster: str | None = None,
              overrides: list[str] | None = None, preset: str | None = None) -> StagePlan:
    from llmray import config as cfglib
    from llmray import stages
    from llmray.plan.cluster import describe

    name = stage_of(config_path, stage)
    cfg = cfglib.load(stages.get(name).config_class(), config_path, overrides or [])
    nodes, label = describe(cluster)
    p = plan_stage(name, cfg, nodes, preset)
    p.cluster = label
    return p


def to_json(p: StagePlan) -> dict:
    import dataclasses

    d = dataclasses.asdict(p)
    d["parts"] = [to_json(q) for q in p.parts]
    return d


def render(p: StagePlan, indent: str = "") -> str:
    out = [f"{indent}stage {p.stage}" + (f" on {p.cluster}" if p.cluster else "")]
    i = indent + "  "
    if p.slots:
        out.append(f"{i}placement (placement group, worker, node, local rank/size, node GPU ids, device):")
        for s in p.slots:
            gpus = ",".join(map(str, s.gpu_ids)) or "-"
            share = f" ({s.gpu_share:g} GPU)" if s.gpu_share and s.gpu_share < 1 else ""
            out.append(f"{i}  {s.group:<14} {s.role:>7} {s.rank:<3} {s.node:<8} local {s.local_rank}/"
                       f"{s.local_world_size}  GPU {gpus:<6} {s.device}{share}")
    for m in p.memory:
        budget = f" (budget {m['budget_gb']:g} GB)" if "budget_gb" in m else ""
        out.append(f"{i}memory {m['role']}: {m['per_worker_gb']:g} GB per worker on {m['where']}{budget}: "
                   f"{m['summary']}")
    for role, d in p.deepspeed.items():
        out.append(f"{i}deepspeed config ({role}): {json.dumps(d, sort_keys=True)}")
    for role, d in p.vllm.items():
        out.append(f"{i}vllm engine kwargs ({role}): {json.dumps(d, sort_keys=True, default=str)}")
    for k, v in p.settings.items():
        out.append(f"{i}{k}: {json.dumps(v, sort_keys=True, default=str)}")
    out += [f"{i}note: {n}" for n in p.notes]
    for q in p.parts:
        out.append(render(q, i))
    return "\n".join(out)
