"""Stage `ppo`: PPO, GRPO or RLOO from an SFT policy on RL prompts, over Ray worker groups, with
checkpoint/resume.

Local:   llmray ppo --config jobs/configs/ppo/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/ppo.py --config jobs/configs/ppo/tiny_cpu.yaml

The recipe: check the role models and load the prompts (before any engine starts), start the role
groups, resume (prompt filter, newest complete checkpoint), then per step the controller's step,
a checkpoint and the held-out evaluation when due; plots, the model artifact, the result dict.
A dead actor or critic rebuilds both training groups and resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmray.rl.config import RLConfig

if TYPE_CHECKING:
    from llmray.rl.controller import Controller
    from llmray.rl.groups import RoleGroups
    from llmray.rl.worker_group import WorkerDiedError

log = logging.getLogger(__name__)

Config = RLConfig


@dataclass
class Inputs:
    """The tokenized RL prompts with their answers, the held-out eval prompts, the ptx data."""

    tokenizer: Any
    records: list[dict]
    prompt_ids: list[list[int]]
    eval_records: list[dict]
    eval_ids: list[list[int]]
    ptx_ids: Any = None


@dataclass
class Progress:
    """What the loop carries from step to step, and the result dict reports."""

    step: int
    kl_ctl: Any
    trainer_restarts: int = 0
    eval_accuracy: list[tuple[int, float]] = field(default_factory=list)
    final_eval: dict = field(default_factory=dict)
    prompt_filter: dict = field(default_factory=dict)
    monitors: Any = None
    """llmray.rl.monitors.Monitors: length drift, reward gain per KL, reward-hacking warnings."""
    prompts_consumed: int = 0
    """The prompt cursor: prompts drawn so far in the seeded order (dynamic sampling draws more than
    algo.prompts_per_step in a step); checkpointed, so a resumed run continues where it stopped."""


def run(cfg: RLConfig, on_step: Callable[["RoleGroups", int, dict], None] | None = None) -> dict:
    """Stage `ppo`: PPO, GRPO or RLOO from an SFT policy on RL prompts, with checkpoint/resume.

    `on_step(roles, step, metrics)`, if given, is called after each logged step (before its checkpoint),
    with the live worker groups in `roles.groups` (a `RoleGroups`): a place to add a metric, a check or
    an early stop (raise) without copying the loop."""
    from llmray import artifacts
    from llmray.cluster import init_ray
    from llmray.config import to_dict
    from llmray.report.metrics import read_metrics
    from llmray.rl.checkpoint import kl_controller
    from llmray.rl.controller import Controller
    from llmray.rl.groups import RoleGroups, validate_models
    from llmray.rl.monitors import Monitors

    if cfg.save_model and artifacts.is_complete(cfg.output, "model") and not cfg.force:
        log.info("%s is a complete model artifact; skipping (force=true to rerun)", cfg.output)
        return {"skipped": True, "output": cfg.output}
    dirs = validate_models(cfg)  # everything a user can get wrong, before any engine starts
    inputs = load_inputs(cfg, dirs["actor"])
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    init_ray(cfg.ray)
    roles = RoleGroups(cfg, dirs)
    controller = Controller(cfg, roles, inputs.tokenizer.pad_token_id, inputs.tokenizer)
    progress = Progress(step=0, kl_ctl=kl_controller(cfg.algo), monitors=Monitors())
    model_dir = None
    try:
        roles.start()
        roles.write_pids()
        resume(cfg, roles, controller, inputs, progress)
        train(cfg, roles, controller, inputs, progress, on_step)
        rows = read_metrics(out / "metrics.jsonl")
        plot(cfg, rows)
        # The last training step's row (the final eval writes a row of its own after it).
        last = next((r for r in reversed(rows) if "rollout/reward_mean" in r), {})
        final = {k: v for k, v in last.items() if isinstance(v, (int, float))}
        if cfg.save_model:
            model_dir = publish(cfg, roles, progress, final)
    finally:
        roles.shutdown()
    return result(cfg, roles, progress, inputs, rows, final, model_dir)


def load_inputs(cfg: RLConfig, actor_dir: str) -> Inputs:
    """Prompts and answers, held-out eval prompts (`eval_prompts`, or `prompts`/eval) and ptx data,
    tokenized with the actor's chat template and cut to leave room for `rollout.max_tokens`."""
    from transformers import AutoTokenizer

    from llmray.rl import data

    tokenizer = AutoTokenizer.from_pretrained(actor_dir)
    limit = cfg.rollout.max_model_len - cfg.rollout.max_tokens
    records = data.read_prompts(data.resolve_split(cfg.prompts, "prompts"))
    default_eval = Path(cfg.prompts) / "eval"
    eval_path = cfg.eval_prompts or (str(default_eval) if default_eval.is_dir() else None)
    eval_records = data.read_prompts(eval_path, limit=cfg.num_eval) if eval_path and cfg.eval_every >= 0 else []
    ptx_ids = None
    if cfg.algo.ptx_coef > 0:
        ptx_ids = data.read_ptx(data.resolve_split(cfg.ptx_data, "sft"), tokenizer, limit)
    return Inputs(tokenizer, records, data.tokenize_prompts(episode_starts(cfg, records), tokenizer, limit),
                  eval_records,
                  data.tokenize_prompts(episode_starts(cfg, eval_records), tokenizer, limit) if eval_records else [],
                  ptx_ids)


def episode_starts(cfg: RLConfig, records: list[dict]) -> list[dict]:
    """The records with the prompt each episode starts from (`Env.reset`: a tool description first
    when the environment offers tools)."""
    from llmray.rl.env import make_env

    return [{**r, "prompt": make_env(r, cfg.rollout.env).reset(r["prompt"])} for r in records]


def resume(cfg: RLConfig, roles: "RoleGroups", controller: "Controller", inputs: Inputs, progress: Progress) -> None:
    """Filter the prompts (reusing the saved list when resuming), then load the checkpoint that
    `checkpoint.resume` names, if any, and give the engines its policy (they start from the SFT dir)."""
    from llmray.rl import checkpoint
    from llmray.rl.prompt_filter import filter_prompts
    from llmray.train.checkpoint import resume_point

    latest = resume_point(cfg.checkpoint.resume, checkpoint.root(roles))
    if cfg.prompt_filter.enabled:
        keep, progress.prompt_filter = filter_prompts(roles, inputs.prompt_ids, inputs.records, inputs.tokenizer,
                                                      resuming=latest is not None)
        inputs.records = [inputs.records[i] for i in keep]
        inputs.prompt_ids = [inputs.prompt_ids[i] for i in keep]
    if latest is not None:
        progress.step, progress.kl_ctl, progress.prompts_consumed = checkpoint.restore(roles, latest)
        log.info("resumed from %s at step %d", latest, progress.step)
        controller.push_weights()


def train(cfg: RLConfig, roles: "RoleGroups", controller: "Controller", inputs: Inputs, progress: Progress,
          on_step) -> None:
    """Steps from `progress.step` to `cfg.steps`: the controller's step, metrics, checkpoint, eval."""
    from llmray.report.metrics import MetricsLogger
    from llmray.rl import checkpoint
    from llmray.rl.data import PromptStream
    from llmray.rl.pipeline import Prompts
    from llmray.rl.worker_group import WorkerDiedError

    stream = PromptStream(len(inputs.records), cfg.seed)

    def draw(k: int) -> Prompts:
        start = progress.prompts_consumed
        idx = stream.indices(start, k)
        progress.prompts_consumed += k
        return Prompts([inputs.prompt_ids[i] for i in idx], [inputs.records[i]["answer"] for i in idx], start)

    with MetricsLogger(Path(cfg.run_dir) / "metrics.jsonl") as logger:
        if progress.step == 0:
            maybe_evaluate(cfg, roles, inputs, progress, logger, 0)
        while progress.step < cfg.steps:
            try:
                metrics, seq_kl = controller.step(progress.step, draw, progress.kl_ctl.value, inputs.ptx_ids)
            except WorkerDiedError as e:
                if not recover(cfg, roles, controller, progress, e):
                    raise
                continue
            progress.kl_ctl.update(seq_kl, cfg.algo.batch_size)
            progress.step += 1
            step = progress.step
            metrics["faults/restarts"] = len(roles.restarts)
            metrics.update(progress.monitors.on_step(step, metrics))
            logger.log(step, metrics)
            if on_step is not None:
                on_step(roles, step, metrics)
            log.info("step %d/%d reward %.3f acc %.3f kl %.4f gap %.4f len %.1f %.1fs", step, cfg.steps,
                     metrics["rollout/reward_mean"], metrics["rollout/accuracy"], metrics["kl/seq_mean"],
                     metrics["rollout/logprob_gap"], metrics["rollout/response_length"], metrics["time/step_s"])
            if step % cfg.checkpoint.every_n_steps == 0 or step == cfg.steps:
                checkpoint.save(roles, step, {"algorithm": cfg.algo.algorithm, "kl": progress.kl_ctl.state_dict(),
                                              "prompts_consumed": trained_cursor(progress, controller)})
            maybe_evaluate(cfg, roles, inputs, progress, logger, step, final=step == cfg.steps)


def trained_cursor(progress: Progress, controller: "Controller") -> int:
    """The prompt cursor of what has been trained on: drawn prompts minus those of batches still
    buffered (async mode), which a resumed run draws again."""
    return progress.prompts_consumed - controller.pipeline.untrained_prompts()


def recover(cfg: RLConfig, roles: "RoleGroups", controller: "Controller", progress: Progress,
            e: "WorkerDiedError") -> bool:
    """A dead actor or critic: rebuild both training groups, go back to the newest complete checkpoint
    (or the start) and push its policy (`fault.max_trainer_restarts` times at most). False: not recoverable."""
    from llmray.rl import checkpoint
    from llmray.train.checkpoint import find_latest

    if e.role not in ("actor", "critic") or progress.trainer_restarts >= cfg.fault.max_trainer_restarts:
        return False
    progress.trainer_restarts += 1
    roles.restart_trainers(f"{e.role} rank(s) {e.ranks} died at step {progress.step + 1}: {e}")
    controller.pipeline.reset()
    latest = find_latest(checkpoint.root(roles))
    if latest is not None:
        progress.step, progress.kl_ctl, progress.prompts_consumed = checkpoint.restore(roles, latest)
    else:
        progress.step, progress.kl_ctl, progress.prompts_consumed = 0, checkpoint.kl_controller(cfg.algo), 0
    controller.push_weights()
    log.warning("resumed from %s at step %d after a %s failure", latest or "the start", progress.step, e.role)
    return True


def maybe_evaluate(cfg: RLConfig, roles: "RoleGroups", inputs: Inputs, progress: Progress, logger, at: int,
                   final: bool = False) -> None:
    """The held-out eval at step 0, every `eval_every` steps and at the end (with `eval_sampled_k`)."""
    from llmray.rl.evaluate import evaluate

    if not inputs.eval_ids:
        return
    due = at == 0 or final or (cfg.eval_every > 0 and at % cfg.eval_every == 0)
    if not due or any(s == at for s, _ in progress.eval_accuracy):
        return
    ev = evaluate(roles, inputs.eval_ids, [r["answer"] for r in inputs.eval_records], inputs.tokenizer,
                  cfg.eval_max_tokens, sampled_k=cfg.eval_sampled_k if final else 0)
    progress.eval_accuracy.append((at, ev["accuracy"]))
    sampled = {"eval/mean_at_k": ev["mean_at_k"]} if "mean_at_k" in ev else {}
    warning = progress.monitors.on_eval(at, ev["accuracy"])
    if warning:
        log.warning("step %d: %s", at, warning)
        sampled["monitor/hacking_warnings"] = len(progress.monitors.warnings)
    logger.log(at, {"eval/accuracy": ev["accuracy"], **sampled})
    log.info("step %d eval accuracy %.3f", at, ev["accuracy"])
    if final:
        progress.final_eval.update(ev)


def plot(cfg: RLConfig, rows: list[dict]) -> None:
    """reward.png (reward and accuracy) and kl.png in `run_dir`."""
    from llmray.report.metrics import series
    from llmray.report.plots import plot_curves

    out, algo = Path(cfg.run_dir), cfg.algo.algorithm
    plot_curves({"reward": series(rows, "rollout/reward_mean"), "accuracy": series(rows, "rollout/accuracy")},
                out / "reward.png", f"{algo}: reward and accuracy")
    plot_curves({"KL (seq)": series(rows, "kl/seq_mean")}, out / "kl.png", f"{algo}: KL to ref")


def publish(cfg: RLConfig, roles: "RoleGroups", progress: Progress, final: dict) -> Path:
    """The actor as a Hugging Face model artifact at `output`, with its manifest written last."""
    from llmray import artifacts
    from llmray.config import to_dict

    model_dir = Path(cfg.output)
    summary = {"steps": progress.step, **{k: final.get(k) for k in ("rollout/reward_mean", "rollout/accuracy")},
               **({"eval/accuracy": progress.eval_accuracy[-1][1]} if progress.eval_accuracy else {})}
    with artifacts.publish(model_dir) as tmp:
        roles.groups["actor"].save_hf(str(tmp))
        artifacts.write_manifest(tmp, "model", __name__, to_dict(cfg), summary)
    return model_dir


def result(cfg: RLConfig, roles: "RoleGroups", progress: Progress, inputs: Inputs, rows: list[dict], final: dict,
           model_dir: Path | None) -> dict:
    """The stage's result dict (what the pipeline and the tests read)."""
    from llmray.rl.evaluate import task_scores

    rollout_restarts = [r for r in roles.restarts if r["role"] == "rollout"]
    reward_first = next((r["rollout/reward_mean"] for r in rows if "rollout/reward_mean" in r), None)
    return {
        "output": str(model_dir) if model_dir else None, "run_dir": str(Path(cfg.run_dir)), "steps": progress.step,
        "algorithm": cfg.algo.algorithm, "reward_first": reward_first, "reward_last": final.get("rollout/reward_mean"),
        "eval_accuracy": progress.eval_accuracy, "restarts": len(roles.restarts),
        "rollout_restarts": len(rollout_restarts), "trainer_restarts": progress.trainer_restarts,
        "reward_hacking_warnings": list(progress.monitors.warnings),
        **task_scores(progress.final_eval, inputs.eval_records),
        **({f"prompt_filter_{k}": v for k, v in progress.prompt_filter.items()} if progress.prompt_filter else {}),
    }
