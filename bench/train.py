"""Benchmark: bare single-process PyTorch training loop vs llmray pretrain on 2 Ray Train workers
at ZeRO-1/2/3/3+offload.

Same model, global batch, sequence length and steps on both sides; the bare loop uses both cores
(2 torch threads), llmray uses 2 workers x 1 thread. ZeRO's collectives go through shared memory
(the default on one host); `zero1_gloo` runs ZeRO-1 over gloo instead, to show what that saves.
This machine's speed drifts by up to 2x within minutes, so besides the bare loop run before Ray
starts ("vs bare"), a shorter bare loop runs between llmray variants, and each variant is compared
with the mean step time of the bare runs right before and right after it ("vs beside": the same
conditions, seconds apart, with Ray idle in the background; a steady drift weighs on both sides
alike). Prints steady-state tokens/s (median over the steps after warm-up), peak RSS per process,
and ratios to the bare loop; saves bench/results/train.json.

    .venv/bin/python bench/train.py [--steps 20] [--preset small] [--global-batch 16,64]   # ~20 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmray.train.loop import PHASES  # the step phases the training loop logs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "train"))
sys.path.insert(0, str(ROOT / "tests"))  # first: its conftest (sample_texts) wins over tests/train's

BARE = r'''
import json, resource, sys, time, torch
import pyarrow.parquet as pq
from pathlib import Path
from llmray.models.factory import ModelConfig, build_model
from llmray.models.tokenizer import load_tokenizer
from llmray.train.deepspeed_config import OptimizerConfig, lr_factor
from llmray.train.engine import param_groups
from llmray.train.lm import token_loss_sum
args = json.loads(sys.argv[1])
torch.set_num_threads(2)
tok = load_tokenizer(args["tokenizer"])
model = build_model(ModelConfig(preset=args["preset"]), tok, seed=0)
opt_cfg = OptimizerConfig(lr=1e-3, warmup_steps=2)
opt = torch.optim.AdamW(param_groups(model, opt_cfg.weight_decay), lr=opt_cfg.lr, betas=opt_cfg.betas)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, opt_cfg, args["steps"]))
rows = []
for f in sorted(Path(args["dataset"]).glob("shards/*.parquet")):
    rows += pq.read_table(f).column("input_ids").to_pylist()
g = args["global_batch"]
times, losses, phases = [], [], []
for step in range(args["steps"]):
    t0 = time.perf_counter()
    batch = torch.tensor([rows[(step * g + i) % len(rows)] for i in range(g)], dtype=torch.long)
    t1 = time.perf_counter()
    logits = model(input_ids=batch, use_cache=False).logits
    s, n = token_loss_sum(logits, batch)
    loss = s / n
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t3 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
    opt.step(); sched.step()
    t4 = time.perf_counter()
    times.append(t4 - t0); losses.append(loss.item())
    phases.append({"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3})
print("RESULT" + json.dumps({"step_times": times, "losses": losses, "phases": phases,
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))
'''

VARIANTS = {
    "zero1": ["deepspeed.zero_stage=1"],
    # the same, with ZeRO's collectives over gloo instead of shared memory (what they cost)
    "zero1_gloo": ["deepspeed.zero_stage=1", "deepspeed.shm_collectives=false"],
    "zero2": ["deepspeed.zero_stage=2"],
    "zero3": ["deepspeed.zero_stage=3"],
    "zero3_offload": ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"],
}


def _phase_medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {ph: statistics.median(r[ph] for r in rows) for ph in PHASES}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", default="16,64",
                    help="comma-separated global batches (sequences per optimizer step), each run on both sides")
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the steady-state figure")
    a = ap.parse_args()
    batches = [int(b) for b in str(a.global_batch).split(",")]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from conftest import sample_texts
    from helpers import write_packed

    from llmray.cluster import RayConfig, init_ray
    from llmray.models.tokenizer import save_tokenizer, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    save_tokenizer(train_tokenizer(sample_texts(1500), vocab_size=1024), work / "tok")
    write_packed(work / "data", work / "tok", seq_len=a.seq_len, n_rows=max(batches) * (a.steps + 2), n_shards=2)
    # Every bare loop runs before Ray starts, so that Ray's idle processes do not slow the baseline.
    results: dict[int, dict[str, dict]] = {gb: {"bare": bare_loop(a, work, gb)} for gb in batches}
    init_ray(RayConfig(num_cpus=4))
    short = {"steps": max(8, a.steps // 2), "warmup": 3}
    for gb in batches:
        before = bare_loop(a, work, gb, **short)  # with Ray up, as every later bare run
        for name, extra in VARIANTS.items():
            print(f"llmray {name}, global batch {gb} ...", flush=True)
            results[gb][name] = llmray_run(a, work, gb, name, extra)
            after = bare_loop(a, work, gb, **short)
            # Bracketed: a drift that is steady across the variant weighs on both sides alike.
            step = (before["step_s"] + after["step_s"]) / 2
            results[gb][name]["beside"] = {"tokens_per_s": gb * a.seq_len / step, "step_s": step,
                                           "before": before, "after": after}
            before = after

    print()
    print(f"{'batch':>6}  {'run':<16}{'tokens/s':>10}{'vs bare':>10}{'bare beside':>13}{'vs beside':>11}"
          f"{'peak RSS/proc GB':>18}{'final loss':>12}{'wall s':>9}")
    for gb, per in results.items():
        base = per["bare"]["tokens_per_s"]
        for name, r in per.items():
            side = r.get("beside", {}).get("tokens_per_s")
            beside = f"{side:>13.0f}{r['tokens_per_s'] / side:>10.2f}x" if side else f"{'':>13}{'':>11}"
            print(f"{gb:>6}  {name:<16}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / base:>9.2f}x{beside}"
                  f"{r['peak_rss_gb']:>18.2f}{r['final_loss']:>12.3f}{r['wall_s']:>9.1f}")
    print(f"(batch = sequences of {a.seq_len} tokens per optimizer step; steady state: median step time after "
          "warm-up; llmray wall time includes Ray Train start-up, DeepSpeed init and checkpoint/export; "
          f"bare beside: the bare loop, {short['steps']} steps, run right before and right after that variant, "
          "mean step time)")
    print()
    print("where a steady step's time goes, median seconds (llmray: rank 0; backward includes ZeRO's gradient "
          "reduction, optimizer its parameter all-gather; other = step minus the phases' medians)")
    print(f"{'batch':>6}  {'run':<16}{'step':>8}" + "".join(f"{ph:>11}" for ph in PHASES) + f"{'other':>9}")
    for gb, per in results.items():
        for name, r in per.items():
            other = r["step_s"] - sum(r["phases"].values())
            print(f"{gb:>6}  {name:<16}{r['step_s']:>8.3f}" + "".join(f"{r['phases'][ph]:>11.3f}" for ph in PHASES)
                  + f"{other:>9.3f}")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    print(f"saved {out_dir / 'train.json'}")


def bare_loop(a, work: Path, gb: int, steps: int | None = None, warmup: int | None = None) -> dict:
    """The baseline: one process, 2 torch threads, plain AdamW, the same data and schedule."""
    steps, warmup = steps or a.steps, a.warmup if warmup is None else warmup
    print(f"bare PyTorch loop: preset {a.preset}, global batch {gb} x {a.seq_len}, {steps} steps, 2 threads",
          flush=True)
    args = {"tokenizer": str(work / "tok"), "dataset": str(work / "data"), "preset": a.preset,
            "steps": steps, "global_batch": gb}
    p = subprocess.run([sys.executable, "-c", BARE, json.dumps(args)], check=False, capture_output=True, text=True,
                       timeout=1800)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    if not line:
        sys.exit(f"bare loop failed:\n{p.stderr[-3000:]}")
    bare = json.loads(line[0][6:])
    st = statistics.median(bare["step_times"][warmup:])
    return {"tokens_per_s": gb * a.seq_len / st, "peak_rss_gb": bare["peak_rss_gb"],
            "final_loss": bare["losses"][-1], "wall_s": sum(bare["step_times"]),
            "step_s": st, "phases": _phase_medians(bare["phases"][warmup:])}


def llmray_run(a, work: Path, gb: int, name: str, extra: list[str]) -> dict:
    """llmray pretrain on 2 Ray Train workers x 1 thread, micro-batch gb/2 each (no accumulation)."""
    from llmray.config import load
    from llmray.report.metrics import read_metrics
    from llmray.stages.pretrain import PretrainConfig, run

    tag = f"{name}_b{gb}"
    cfg = load(PretrainConfig, None, [
        f"dataset={work / 'data'}", f"run_dir={work / tag}", f"output={work / (tag + '_model')}",
        f"max_steps={a.steps}", f"checkpoint.every_n_steps={a.steps}", f"log_every={a.steps}",
        f"model.preset={a.preset}", f"deepspeed.micro_batch_size={gb // 2}",
        "optimizer.lr=1e-3", "optimizer.warmup_steps=2", "scaling.num_workers=2",
        "scaling.threads_per_worker=1", *extra])
    t0 = time.monotonic()
    run(cfg)
    rows = [r for r in read_metrics(work / tag / "metrics.jsonl") if "step_time_s" in r]
    # The checkpoint step is excluded from steady state (it writes the whole engine state).
    steady = [r["step_time_s"] for r in rows[a.warmup:-1]] or [r["step_time_s"] for r in rows]
    phase_rows = [{ph: r[f"time/{ph}_s"] for ph in PHASES} for r in rows[a.warmup:-1] or rows]
    return {"tokens_per_s": gb * a.seq_len / statistics.median(steady),
            "step_s": statistics.median(steady), "phases": _phase_medians(phase_rows),
            "peak_rss_gb": max(r["memory/peak_rss_gb"] for r in rows),
            "final_loss": rows[-1]["train/loss"], "wall_s": time.monotonic() - t0,
            "mfu": statistics.median(r.get("mfu", 0.0) for r in rows[a.warmup:] or rows)}


if __name__ == "__main__":
    main()
