"""One planner per kind of stage: what it would place, how much memory each worker needs, and the exact
DeepSpeed config and vLLM engine arguments, from the functions the stage itself calls."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmray.config import to_dict
from llmray.placement import EPS, Group, Node, PlanError, Role, Slot, gpu_load, place


@dataclass
class StagePlan:
    stage: str
    cluster: str
    slots: list[Slot] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    """One row per role: role, workers, per_worker_gb, where (GPU or host), summary."""
    deepspeed: dict[str, dict] = field(default_factory=dict)
    """Role -> the dict `deepspeed.initialize(config=...)` gets."""
    vllm: dict[str, dict] = field(default_factory=dict)
    """Role -> the engine arguments vLLM gets."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Other settings worth seeing (Ray Data, Serve deployment options)."""
    notes: list[str] = field(default_factory=list)
    parts: list["StagePlan"] = field(default_factory=list)
    """A pipeline's stages."""


def model_shape_for(model_dir: str | None, preset: str | None, key: str, notes: list[str]):
    """The shape of the HF model at `model_dir`, else of `preset` (`--model-preset`), else None."""
    from llmray.models.factory import PRESETS

    if model_dir and (Path(model_dir) / "config.json").is_file():
        import json

        from llmray.models.model_dir import model_shape

        return model_shape(json.loads((Path(model_dir) / "config.json").read_text()))
    if preset:
        if preset not in PRESETS:
            raise PlanError(f"--model-preset: unknown preset {preset!r}; one of {', '.join(PRESETS)}")
        notes.append(f"{key}: {model_dir} is not there yet; memory estimated for model preset {preset!r}")
        return PRESETS[preset]
    notes.append(f"{key}: {model_dir} is not there yet; no memory estimate (pass --model-preset, e.g. 1b)")
    return None


def _node(nodes: list[Node], name: str) -> Node:
    return next(n for n in nodes if n.name == name)


def _shm(ds, slots: list[Slot], on_gpu: bool) -> bool:
    """What `shm_comm.active()` will say: gloo with every rank on one host and shm_collectives on."""
    backend = ds.backend if ds.backend != "auto" else ("nccl" if on_gpu else "gloo")
    return ds.shm_collectives and backend == "gloo" and len({s.node for s in slots}) == 1


# -- training stages (pretrain, sft, reward-model, dpo) -----------------------------------------------

def plan_train(stage: str, cfg, nodes: list[Node], preset: str | None) -> StagePlan:
    from llmray.train.deepspeed_config import ds_config
    from llmray.train.memory import check_budget
    from llmray.train.trainer import estimate_memory, worker_resources

    p = StagePlan(stage, "")
    sc = cfg.scaling
    keys = {"GPU": "scaling.use_gpu"}
    group = Group((Role("train", sc.num_workers, worker_resources(sc), "scaling", keys),), ray_train=True)
    p.slots = place([group], nodes)
    p.deepspeed["train"] = ds_config(cfg.deepspeed, cfg.optimizer, sc.num_workers,
                                     shm=_shm(cfg.deepspeed, p.slots, sc.use_gpu))
    shape, seq_len, trainable, copies = _train_inputs(stage, cfg, preset, p.notes)
    if shape is None:
        return p
    est = estimate_memory(cfg, shape, seq_len, trainable, copies)
    if sc.use_gpu:
        budget = min(_node(nodes, s.node).gpu_memory_gb for s in p.slots)
        where, key = "GPU", f"the {budget:g} GB of one GPU (scaling.use_gpu)"
    else:
        per_node = {s.node: s.local_world_size for s in p.slots}
        budget = min(_node(nodes, n).memory_gb / k for n, k in per_node.items())
        where, key = "host", f"the node's RAM per worker ({budget:.1f} GB)"
    if cfg.memory_budget_gb:
        budget, key = cfg.memory_budget_gb, f"memory_budget_gb={cfg.memory_budget_gb:g}"
    p.memory.append({"role": "train", "workers": sc.num_workers, "per_worker_gb": round(est.device_gb, 2),
                     "budget_gb": round(budget, 1), "where": where, "seq_len": seq_len, "summary": est.summary()})
    check_budget(est, budget, cfg.deepspeed, sc.num_workers, budget_what=key)
    return p


def _train_inputs(stage: str, cfg, preset: str | None, notes: list[str]):
    """(shape, seq_len, trainable params, copies) as the stage's own check_memory call gets them."""
    if stage == "pretrain":
        from llmray.stages.pretrain import inspect_dataset

        shape = cfg.model.resolved()
        if cfg.model.vocab_size:
            shape = replace(shape, vocab_size=cfg.model.vocab_size)
        seq_len = shape.max_position_embeddings
        try:
            seq_len = inspect_dataset(cfg.dataset)["seq_len"]
        except Exception:  # noqa: BLE001 - a dry run may come before the pack stage
            notes.append(f"dataset: {cfg.dataset} is not readable yet; seq_len = the model's context ({seq_len})")
        return shape, seq_len, None, 1
    shape = model_shape_for(cfg.model, preset, "model", notes)
    trainable, copies = None, 1
    if stage == "sft":
        from llmray.stages.sft import lora_trainable

        trainable = lora_trainable(shape, cfg.lora) if shape is not None else None
    elif stage in ("reward-model", "dpo"):
        import importlib

        copies = importlib.import_module(f"llmray.stages.{stage.replace('-', '_')}").MEMORY_COPIES
    return shape, cfg.seq_len, trainable, copies


# -- RL (ppo) -----------------------------------------------------------------------------------------

def plan_rl(cfg, nodes: list[Node], preset: str | None) -> StagePlan:
    from llmray.config import build
    from llmray.rl.groups import placement_groups, rollout_init_kwargs, trainer_deepspeed
    from llmray.rl.workers.rollout import rollout_engine
    from llmray.train.deepspeed_config import DeepSpeedConfig, ds_config
    from llmray.vllm_engine import llm_kwargs

    p = StagePlan("ppo", "")
    p.slots = place(placement_groups(cfg), nodes)
    on_gpu = {role: getattr(cfg, role).gpus_per_worker > 0 for role in ("actor", "critic", "ref", "reward", "rollout")}
    trainers = ["actor"] + (["critic"] if cfg.algo.uses_critic else [])
    ds = {}
    for role in trainers:
        rc = getattr(cfg, role)
        ds[role] = build(DeepSpeedConfig, trainer_deepspeed(cfg, role), f"{role}.deepspeed")
        mine = [s for s in p.slots if s.role == role]
        p.deepspeed[role] = ds_config(ds[role], rc.optimizer, rc.num_workers, shm=_shm(ds[role], mine, on_gpu[role]))
    actor_dir = cfg.actor.model or cfg.model
    if cfg.rollout.engine == "vllm":
        ecfg, extra = rollout_engine(**rollout_init_kwargs(cfg, actor_dir))
        p.vllm["rollout"] = llm_kwargs(actor_dir, ecfg, gpu=on_gpu["rollout"], check_files=False, **extra)
    else:
        p.notes.append("rollout.engine is hf: batched transformers generate, no vLLM engine")
    _rl_memory(p, cfg, nodes, preset, ds, on_gpu)
    return p


def _rl_memory(p: StagePlan, cfg, nodes: list[Node], preset: str | None, ds: dict, on_gpu: dict) -> None:
    from llmray.train import memory

    shape = model_shape_for(cfg.actor.model or cfg.model, preset, "model", p.notes)
    if shape is None:
        return
    seq = cfg.rollout.max_model_len
    # A role with a model directory of its own (critic/reward from the reward model, a different ref)
    # is estimated with that model's shape; the others with the policy's.
    own = {"critic": cfg.critic.model or (cfg.reward.model if cfg.reward.kind != "rule" else None),
           "ref": cfg.ref.model, "reward": cfg.reward.model}

    def shape_of(role: str):
        d = own.get(role)
        return model_shape_for(d, None, f"{role}.model", []) if d and (Path(d) / "config.json").is_file() else shape
    per: dict[str, tuple[float, Any]] = {}
    for role in ds:
        rc = getattr(cfg, role)
        est = memory.estimate(shape_of(role), ds[role], seq, rc.num_workers, on_gpu=on_gpu[role])
        per[role] = (est.device_gb, est)
    per["ref"] = (memory.inference_gb(shape_of("ref"), cfg.ref.micro_batch_size, seq, on_gpu=on_gpu["ref"]), None)
    if cfg.reward.kind != "rule":
        # 32: RewardWorker's micro-batch (RoleGroups keeps its default)
        per["reward"] = (memory.inference_gb(shape_of("reward"), 32, seq, on_gpu=on_gpu["reward"]), None)
    weights_gb = shape.num_params() * 2 / memory.GB  # vLLM holds bf16 weights
    util = p.vllm.get("rollout", {}).get("gpu_memory_utilization", 0.0)
    for role, (gb, est) in per.items():
        p.memory.append({"role": role, "workers": getattr(cfg, role).num_workers, "per_worker_gb": round(gb, 2),
                         "where": "GPU" if on_gpu[role] else "host",
                         "summary": est.summary() if est is not None else "frozen model, forward only"})
    # Every GPU: the trainers and frozen models on it, and the share vLLM takes of it.
    shared = p.settings.setdefault("gpu_memory_gb", {})
    for (node, gpu), users in gpu_load(p.slots).items():
        cap = _node(nodes, node).gpu_memory_gb
        used = sum(per[s.role][0] for s in users if s.role in per)
        used += sum(util * cap for s in users if s.role == "rollout")
        shared[f"{node} GPU {gpu}"] = f"{' + '.join(f'{s.role} {s.rank}' for s in users)}: {used:.1f} of {cap:g}"
        if used > cap + EPS:
            worst = max((s for s in users if s.role in per), key=lambda s: per[s.role][0], default=users[0])
            names = " + ".join(f"{s.role} {s.rank}" for s in users)
            if worst.role in ds:
                from llmray.train.memory import check_budget

                other = used - per[worst.role][0]
                check_budget(per[worst.role][1], max(0.0, cap - other), ds[worst.role],
                             getattr(cfg, worst.role).num_workers, prefix=f"{worst.role}.",
                             workers_key=f"{worst.role}.num_workers",
                             budget_what=f"the {max(0.0, cap - other):.1f} GB left for it on GPU {gpu} of {node} "
                                         f"({cap:g} GB, shared by {names})")
            raise PlanError(f"{worst.role}.gpus_per_worker: GPU {gpu} of {node} ({cap:g} GB) holds {names}, "
                            f"estimated {used:.1f} GB; give {worst.role} a GPU of its own or fewer sharers")
    if on_gpu["rollout"] and weights_gb > util * min(n.gpu_memory_gb for n in nodes if n.gpus) + EPS:
        raise PlanError(f"rollout.gpus_per_worker: the policy's bf16 weights ({weights_gb:.1f} GB) exceed the "
                        f"{util:g} share of one GPU that each vLLM engine takes")
    host: dict[str, float] = {}
    for s in p.slots:
        if s.gpu_share <= EPS and s.role in per:
            host[s.node] = host.get(s.node, 0.0) + per[s.role][0]
        elif s.role == "rollout" and not on_gpu["rollout"]:
            host[s.node] = host.get(s.node, 0.0) + weights_gb + cfg.rollout.kv_cache_gb
    for node, gb in host.items():
        cap = _node(nodes, node).memory_gb
        if cap and gb > cap + EPS:
            raise PlanError(f"actor.num_workers: the CPU workers on {node} need an estimated {gb:.1f} GB but it has "
                            f"{cap:g} GB of RAM; fewer workers per node, or describe more nodes")


# -- serve, quantize, data stages ---------------------------------------------------------------------

def plan_serve(cfg, nodes: list[Node]) -> StagePlan:
    from llmray.serving.app import deployment_options
    from llmray.vllm_engine import async_engine_kwargs

    p = StagePlan("serve", "")
    dep, auto = cfg.deployment, cfg.deployment.autoscaling
    opts = deployment_options(cfg)
    actor = opts["ray_actor_options"]  # what Serve asks Ray for, per replica
    bundle = {"CPU": actor["num_cpus"], **({"GPU": actor["num_gpus"]} if actor["num_gpus"] else {})}
    n = max(1, auto.max_replicas)
    keys = {"CPU": "deployment.num_cpus", "GPU": "deployment.num_gpus",
            "workers": "deployment.autoscaling.max_replicas"}
    p.slots = place([Group((Role("replica", n, bundle, "deployment", keys),))], nodes)
    on_gpu = dep.num_gpus > 0
    p.vllm["replica"] = async_engine_kwargs(cfg.model, cfg.engine, cfg.name(), gpu=on_gpu, check_files=False,
                                            **cfg.serving_engine_kwargs())
    opts["ray_actor_options"] = {k: v for k, v in actor.items() if k != "runtime_env"}
    p.settings["deployment"] = opts
    p.notes.append(f"placed at deployment.autoscaling.max_replicas={n} replicas (Serve starts "
                   f"{max(1, auto.min_replicas)} and adds replicas under load)")
    if on_gpu:
        gpu_gb = min(nd.gpu_memory_gb for nd in nodes if nd.gpus)
        kv_gb = cfg.engine.gpu_memory_utilization * gpu_gb
        p.memory.append({"role": "replica", "workers": n, "per_worker_gb": round(kv_gb, 1), "where": "GPU",
                         "summary": f"vLLM takes engine.gpu_memory_utilization={cfg.engine.gpu_memory_utilization:g}"
                                    f" of the GPU for weights + KV cache"})
    return p


def plan_driver_only(stage: str, cfg) -> StagePlan:
    """Quantize: in the driver process (transformers), no worker group."""
    p = StagePlan(stage, "")
    p.notes.append(f"{stage} runs in the driver process: no worker groups, no DeepSpeed, no vLLM engine "
                   f"(the quality gate evaluates with transformers)")
    return p


RAY_DEFAULTS = ("ray.resource_wait_s", "ray.connect_timeout_s")
DATA_KEYS = ("cpus", "partitions", "chunk_rows", "batch", "concurrency", "workers", "shard")


RAY_DATA_STAGES = ("clean-dedup", "pack")


def plan_data(stage: str, cfg) -> StagePlan:
    """Data stages: Ray Data / Ray tasks, no worker groups; the settings that size their tasks."""
    p = StagePlan(stage, "")
    if stage not in RAY_DATA_STAGES:
        p.notes.append(f"{stage} runs in the driver process: no Ray, no worker groups")
        return p

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k != "env":
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    # The keys that size its tasks, and the Ray settings that differ from a local cluster's defaults.
    p.settings["ray_data"] = {k: v for k, v in flat(to_dict(cfg))
                              if (not k.startswith("ray.") and any(w in k.rsplit(".", 1)[-1] for w in DATA_KEYS))
                              or (k.startswith("ray.") and v not in (None, {}, False) and k not in RAY_DEFAULTS)}
    p.notes.append(f"{stage} runs Ray Data tasks sized by these settings; no worker groups")
    return p
