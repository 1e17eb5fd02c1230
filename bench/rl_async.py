"""Sync vs async RL: GRPO steps per second and reward curves at the same step count, prompts and
seed, with the rollout engine and the trainer on disjoint CPUs (one core each, `threads=1`). Async
runs twice: with partial rollouts (`async`, the default: segments of `--segment-tokens`) and with
each batch generated in one call (`async-whole`, `rollout.partial: false`).

    python bench/rl_async.py                    # 16 steps x 8 prompts x 8 samples, staleness 1
    python bench/rl_async.py --steps 8 --max-staleness 2
Prints the table (steps/s, ratio, phase times, reward) and writes bench/results/rl_async.json and
bench/results/rl_async.png (reward curves of both modes on one plot). The policy is the tiny model
after the RL tests' short SFT (`tests/rl/sft_setup.py`), on 32 fixed task prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("generation", "scoring", "training", "rollout_wait", "weight_sync")


def build_policy(work: Path) -> tuple[Path, Path]:
    """Tokenizer, tiny model, short SFT (the RL tests' setup), and 32 fixed task prompts."""
    sys.path.insert(0, str(ROOT / "tests" / "rl"))
    sys.path.insert(0, str(ROOT / "tests"))  # first: its conftest has sample_texts
    from conftest import sample_texts
    from sft_setup import quick_sft

    from llmray.data import tasks
    from llmray.models.factory import ModelConfig, build_model, save_pretrained
    from llmray.models.tokenizer import train_tokenizer

    sft = work / "sft"
    if not (sft / "config.json").is_file():
        print("building the tiny SFT policy (tokenizer, model, 100 SFT steps) ...", flush=True)
        tok = train_tokenizer(sample_texts(), vocab_size=1024)
        save_pretrained(build_model(ModelConfig(preset="tiny"), tok, seed=0), tok, work / "base")
        quick_sft(work / "base", sft, steps=100)
    prompts = work / "prompts"
    rng = random.Random(3)
    lines = [json.dumps(tasks.prompt_record(tasks.make_task(rng, kind))) + "\n"
             for kind in ("add", "sub", "max", "repeat") * 8]
    for split in ("prompts", "eval"):
        (prompts / split).mkdir(parents=True, exist_ok=True)
        (prompts / split / "part-00000.jsonl").write_text("".join(lines))
    return sft, prompts


def run_mode(mode: str, sft: Path, prompts: Path, work: Path, args) -> dict:
    from llmray.config import load
    from llmray.report.metrics import read_metrics
    from llmray.rl.config import RLConfig
    from llmray.stages.ppo import run

    run_dir = work / f"run_{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load(RLConfig, None, [
        f"model={sft}", f"prompts={prompts}", f"run_dir={run_dir}", f"output={work / 'model'}",
        f"steps={args.steps}", "eval_every=-1", "save_model=false", "checkpoint.every_n_steps=1000", "threads=1",
        "algo.algorithm=grpo", f"algo.n_samples={args.n_samples}", f"algo.prompts_per_step={args.prompts_per_step}",
        f"algo.minibatch_size={args.n_samples * args.prompts_per_step}", "algo.tis_cap=2.0", "algo.kl_coef=0.01",
        "actor.optimizer.lr=1e-3", f"rollout.max_tokens={args.max_tokens}", "rollout.max_model_len=128",
        "rollout.cpus_per_worker=1", "actor.cpus_per_worker=1", "ref.cpus_per_worker=0.25",
        "reward.cpus_per_worker=0.25", f"rollout.mode={mode.split('-')[0]}",
        f"rollout.max_staleness={args.max_staleness}", f"rollout.segment_tokens={args.segment_tokens}",
        *(["rollout.partial=false"] if mode == "async-whole" else []),
    ])
    print(f"{mode}: {args.steps} GRPO steps ...", flush=True)
    t0 = time.monotonic()
    run(cfg)
    wall = time.monotonic() - t0
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "time/step_s" in r]
    use = rows[1:]  # step 1 carries first-call warm-ups (and async's first batch is not overlapped)
    loop_s = sum(r["time/step_s"] for r in use)
    return {"mode": mode, "steps_timed": len(use), "loop_s": loop_s, "steps_per_s": len(use) / loop_s,
            "wall_s": wall, "phases_s": {p: statistics.mean(r.get(f"time/{p}_s", 0.0) for r in use) for p in PHASES},
            "reward": [(r["step"], r["rollout/reward_mean"]) for r in rows],
            "reward_last3": statistics.mean(r["rollout/reward_mean"] for r in rows[-3:]),
            "staleness_max": max(r.get("rollout/staleness", 0.0) for r in rows),
            "partial_frac": statistics.mean(r.get("rollout/partial_frac", 0.0) for r in use)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-staleness", type=int, default=1)
    p.add_argument("--segment-tokens", type=int, default=8)
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / "rl_async"))
    args = p.parse_args()
    from llmray.cluster import RayConfig, init_ray
    from llmray.report.plots import plot_curves

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sft, prompts = build_policy(work)
    init_ray(RayConfig(num_cpus=4))
    res = {m: run_mode(m, sft, prompts, work, args) for m in ("sync", "async", "async-whole")}
    s, a, w = res["sync"], res["async"], res["async-whole"]
    print(f"\n{'mode':<11} {'steps/s':>8} {'loop s':>7} " + " ".join(f"{ph:>12}" for ph in PHASES)
          + f" {'reward(last3)':>14} {'staleness':>9} {'partial':>7}")
    for r in (s, a, w):
        print(f"{r['mode']:<11} {r['steps_per_s']:>8.3f} {r['loop_s']:>7.1f} "
              + " ".join(f"{r['phases_s'][ph]:>12.2f}" for ph in PHASES)
              + f" {r['reward_last3']:>14.3f} {r['staleness_max']:>9.0f} {r['partial_frac']:>7.3f}")
    ratio = a["steps_per_s"] / s["steps_per_s"]
    print(f"async / sync steps per second: {ratio:.2f}x (target >= 1.3x); "
          f"async-whole / sync: {w['steps_per_s'] / s['steps_per_s']:.2f}x; "
          f"reward over the last 3 steps: sync {s['reward_last3']:.3f}, async {a['reward_last3']:.3f}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    plot_curves({"sync": s["reward"], "async": a["reward"], "async-whole": w["reward"]}, out / "rl_async.png",
                f"GRPO reward, sync vs async (staleness {args.max_staleness})", ylabel="reward (mean)")
    (out / "rl_async.json").write_text(json.dumps({"args": vars(args), "ratio": ratio, **res}, indent=2))
    print(f"wrote {out / 'rl_async.json'} and {out / 'rl_async.png'}")


if __name__ == "__main__":
    main()
