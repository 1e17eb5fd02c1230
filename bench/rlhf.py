"""RLHF benchmark: (a) rollout tokens/s of a vLLM RolloutWorker (eager, as RL runs it by default,
and torch.compiled) vs an HFRolloutWorker (batched transformers `generate`) inside the same kind of
Ray actor, same model and prompts, next to the machine's matmul-only ceiling for that decode; (b) the time
of one PPO step split by phase (generation; scoring = reward, ref and actor log-probs and critic
values at once; training; weight sync) from a short run of the real controller, and weight sync's share of the step;
(c) weight-sync push time per MiB of each transport (`object_store`, `collective` over gloo), same
actor and engine, pushes alternated, side by side with the ratio.

    python bench/rlhf.py                          # small preset (~11M params), 64 prompts x 64 tokens
    python bench/rlhf.py --preset tiny --prompts 32 --max-tokens 32 --ppo-steps 3
    python bench/rlhf.py --parts sync,ppo         # only (c) and (b)
Results: bench/results/rlhf.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_models(work: Path, preset: str) -> tuple[Path, Path]:
    """A tokenizer trained on task text and an untrained `preset` model (throughput only)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import sample_texts

    from llmray.models.factory import ModelConfig, build_model, save_pretrained
    from llmray.models.tokenizer import save_tokenizer, train_tokenizer

    model_dir = work / f"model_{preset}"
    if not (model_dir / "config.json").is_file():
        tok = train_tokenizer(sample_texts(1500), vocab_size=1024)
        save_tokenizer(tok, work / "tokenizer")
        save_pretrained(build_model(ModelConfig(preset=preset), tok, seed=0), tok, model_dir)
    prompts = work / "corpus"
    if not (prompts / "prompts").is_dir():
        from llmray.data import tasks

        for split, n, seed in (("prompts", 512, 1), ("eval", 32, 2)):
            (prompts / split).mkdir(parents=True, exist_ok=True)
            rng = random.Random(seed)
            with (prompts / split / "part-00000.jsonl").open("w") as f:
                for _ in range(n):
                    f.write(json.dumps(tasks.prompt_record(tasks.make_task(rng))) + "\n")
    return model_dir, prompts


def rollout_throughput(model_dir: Path, n_prompts: int, max_tokens: int, repeats: int) -> dict:
    """Tokens/s of each engine in a one-worker rollout group (1 CPU), fixed-length generations. Both
    get the node's cores as threads, as the RL controller gives its rollout workers."""

    from transformers import AutoTokenizer

    from llmray.data import tasks
    from llmray.rl.worker_group import WorkerGroup
    from llmray.rl.workers.rollout import HFRolloutWorker, RolloutWorker

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    prompts = [tok.apply_chat_template(tasks.make_task(rng).messages(), add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for _ in range(n_prompts)]
    # ignore_eos: every response is exactly max_tokens long, so both engines do the same work.
    sampling = {"n": 1, "temperature": 1.0, "max_tokens": max_tokens, "ignore_eos": True, "seed": 0}
    out = {}
    vllm_kw = {"dtype": "auto", "kv_cache_gb": 1}
    for name, cls, kw in (("vllm", RolloutWorker, {**vllm_kw, "enforce_eager": True}),  # rollout.enforce_eager default
                          ("vllm/compiled", RolloutWorker, {**vllm_kw, "enforce_eager": False}),
                          ("hf", HFRolloutWorker, {"dtype": "float32", "batch_size": n_prompts})):
        t0 = time.perf_counter()
        g = WorkerGroup("rollout", cls, 1, {"CPU": 1}, {"model_dir": str(model_dir), "max_model_len": 512, **kw},
                        env={"OMP_NUM_THREADS": str(os.cpu_count() or 1)})
        start_s = time.perf_counter() - t0
        try:
            g.generate(prompts[:4], {**sampling, "max_tokens": 4})  # warm-up (compile, allocator)
            runs = []
            for _ in range(repeats):
                t = time.perf_counter()
                res = g.generate(prompts, sampling)
                runs.append((sum(len(r["response_ids"]) for r in res), time.perf_counter() - t))
        finally:
            g.shutdown()
        tokens = sum(n for n, _ in runs)
        secs = sum(s for _, s in runs)
        out[name] = {"tokens_per_s": tokens / secs, "tokens": tokens, "seconds": secs, "start_s": start_s}
        print(f"  {name:13s} {tokens / secs:9.1f} tok/s  ({tokens} tokens in {secs:.1f}s, start {start_s:.1f}s)",
              flush=True)
    out["ratio_vllm_over_hf"] = out["vllm"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    out["ratio_vllm_compiled_over_hf"] = out["vllm/compiled"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    return out


def matmul_ceiling(model_dir: Path, batch: int, threads: int, repeats: int = 100) -> dict:
    """The decode speed no engine can beat here: one decode step of `batch` sequences runs at least
    the model's weight matmuls, [batch x in] @ [in x out] for every linear layer and the LM head,
    timed with torch at the engines' thread count. Attention, norms, sampling and scheduling come on
    top, so real engines reach a fraction of this."""
    import torch

    c = json.loads((model_dir / "config.json").read_text())
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c.get("num_key_value_heads", c["num_attention_heads"]) * hd
    per_layer = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def secs(k: int, n: int) -> float:
            a, w = torch.randn(batch, k), torch.randn(k, n)
            for _ in range(5):
                a @ w
            t = time.perf_counter()
            for _ in range(repeats):
                a @ w
            return (time.perf_counter() - t) / repeats

        step = layers * sum(secs(k, n) for k, n in per_layer) + secs(h, vocab)
    finally:
        torch.set_num_threads(prev)
    flops = 2 * batch * (layers * sum(k * n for k, n in per_layer) + h * vocab)
    return {"batch": batch, "threads": threads, "step_s": step, "tokens_per_s": batch / step,
            "gflops": flops / step / 1e9}


# scoring = reward, ref and actor log-probs and critic values, which run at once
PHASES = ("generation", "scoring", "training", "weight_sync")


def sync_speed(model_dir: Path, repeats: int, bucket_mb: float) -> dict:
    """Median push seconds and ms per MiB of each transport, from one 1-CPU actor (the RL default:
    DeepSpeed, fp32) into one vLLM engine (the RL default dtype); pushes alternate between transports."""
    from llmray.config import to_dict
    from llmray.rl.config import TrainRoleConfig
    from llmray.rl.weight_collective import CollectiveSync
    from llmray.rl.weight_sync import WeightSync
    from llmray.rl.worker_group import WorkerGroup
    from llmray.rl.workers.actor import ActorWorker
    from llmray.rl.workers.rollout import RolloutWorker

    rc = TrainRoleConfig()
    env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    actor = WorkerGroup("actor", ActorWorker, 1, {"CPU": 1}, {"model_dir": str(model_dir), "deepspeed": to_dict(
        rc.deepspeed), "optimizer": to_dict(rc.optimizer)}, env=env)
    engine = WorkerGroup("rollout", RolloutWorker, 1, {"CPU": 1}, {"model_dir": str(model_dir), "max_model_len": 256,
                                                                   "dtype": "auto", "kv_cache_gb": 1}, env=env)
    syncs = {"object_store": WeightSync(bucket_mb, 600), "collective": CollectiveSync(bucket_mb, 600, "gloo")}
    times: dict[str, list[float]] = {k: [] for k in syncs}
    size, parts = {}, {"engine_wait_s": [], "engine_load_s": []}
    try:
        for i in range(repeats + 1):                      # the first push of each is a warm-up
            for name, sync in syncs.items():
                m = sync.push_actor(actor, engine)
                size[name] = m["weight_sync/bytes"]
                if i:
                    times[name].append(m["weight_sync/sync_s"])
                    for k in parts if name == "collective" else ():
                        parts[k].append(m[f"weight_sync/{k}"])
    finally:
        actor.shutdown()
        engine.shutdown()
    out = {}
    for name, ts in times.items():
        mib = size[name] / 2**20
        s = statistics.median(ts)
        out[name] = {"push_s": s, "mib": mib, "ms_per_mib": 1000 * s / mib, "pushes": len(ts)}
    out["collective"].update({k: statistics.median(v) for k, v in parts.items()})
    out["ratio_object_store_over_collective"] = out["object_store"]["ms_per_mib"] / out["collective"]["ms_per_mib"]
    out["bucket_mb"] = bucket_mb
    return out


def ppo_step_phases(model_dir: Path, corpus: Path, work: Path, steps: int, max_tokens: int,
                    transport: str = "auto") -> dict:
    """Run the real PPO controller for `steps` steps and average each phase over steps 2..N
    (step 1 includes first-call warm-ups)."""
    from llmray.config import load
    from llmray.report.metrics import read_metrics
    from llmray.rl.config import RLConfig
    from llmray.stages.ppo import run

    run_dir = work / "ppo_run"
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load(RLConfig, None, [
        f"model={model_dir}", f"prompts={corpus}", f"run_dir={run_dir}", f"output={work / 'ppo_model'}",
        f"steps={steps}", "eval_every=-1", "save_model=false", "checkpoint.every_n_steps=1000",
        "algo.algorithm=ppo", "algo.n_samples=4", "algo.prompts_per_step=8", "algo.minibatch_size=16",
        f"rollout.max_tokens={max_tokens}", "rollout.max_model_len=256", "rollout.cpus_per_worker=1",
        "actor.cpus_per_worker=1", "critic.cpus_per_worker=0.5", "ref.cpus_per_worker=0.25",
        "reward.cpus_per_worker=0.25", f"weight_sync.transport={transport}",
    ])
    run(cfg)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "time/step_s" in r]
    use = rows[1:] or rows
    phases = {p: statistics.mean(r.get(f"time/{p}_s", 0.0) for r in use) for p in PHASES}
    step_s = statistics.mean(r["time/step_s"] for r in use)
    out = {"steps_measured": len(use), "step_s": step_s, "phases_s": phases, "transport": transport,
           "weight_sync_share": phases["weight_sync"] / step_s,
           "weight_sync_bytes": use[-1].get("weight_sync/bytes"),
           "rollout_tokens_per_step": statistics.mean(r["rollout/tokens"] for r in use)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ppo-steps", type=int, default=4)
    ap.add_argument("--ppo-max-tokens", type=int, default=32)
    ap.add_argument("--sync-repeats", type=int, default=5)
    ap.add_argument("--sync-bucket-mb", default="64,8", help="weight_sync.bucket_mb values to measure (comma list)")
    ap.add_argument("--ppo-transport", default="auto", help="weight_sync.transport of the PPO run")
    ap.add_argument("--parts", default="rollout,ppo,sync", help="which of rollout, ppo, sync to run")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench_rlhf"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from llmray.cluster import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=4))
    model_dir, corpus = build_models(work, args.preset)
    from llmray.models.factory import load_pretrained

    n_params = sum(p.numel() for p in load_pretrained(model_dir)[0].parameters())
    print(f"model: {args.preset} preset, {n_params / 1e6:.1f}M params; "
          f"{args.prompts} prompts x {args.max_tokens} tokens")
    parts = set(args.parts.split(","))
    a = b = c = ceil = None
    if "rollout" in parts:
        print("(a) rollout throughput, one worker, 1 CPU each:", flush=True)
        a = rollout_throughput(model_dir, args.prompts, args.max_tokens, args.repeats)
        ceil = matmul_ceiling(model_dir, args.prompts, os.cpu_count() or 1)
    if "ppo" in parts:
        print(f"(b) PPO step phases, {args.ppo_steps} steps of 8 prompts x 4 samples x {args.ppo_max_tokens} "
              f"tokens, weight_sync.transport={args.ppo_transport}:", flush=True)
        b = ppo_step_phases(model_dir, corpus, work, args.ppo_steps, args.ppo_max_tokens, args.ppo_transport)
    if "sync" in parts:
        print(f"(c) weight sync, {args.sync_repeats} pushes per transport, alternated:", flush=True)
        c = [sync_speed(model_dir, args.sync_repeats, float(mb)) for mb in args.sync_bucket_mb.split(",")]

    if a is not None:
        print()
        print(f"{'rollout engine':<16}{'tokens/s':>12}{'start s':>10}")
        for name in ("vllm", "vllm/compiled", "hf"):
            print(f"{name:<16}{a[name]['tokens_per_s']:>12.1f}{a[name]['start_s']:>10.1f}")
        print(f"ratio vLLM / HF generate: {a['ratio_vllm_over_hf']:.2f}x eager (the RL default), "
              f"{a['ratio_vllm_compiled_over_hf']:.2f}x compiled  (target >= 5x)")
        print(f"matmul-only ceiling at batch {ceil['batch']} ({ceil['threads']} threads, {ceil['gflops']:.0f} "
              f"GFLOP/s): {ceil['tokens_per_s']:.0f} tok/s; vLLM eager reaches "
              f"{a['vllm']['tokens_per_s'] / ceil['tokens_per_s']:.0%} "
              f"of it, compiled {a['vllm/compiled']['tokens_per_s'] / ceil['tokens_per_s']:.0%}, HF "
              f"{a['hf']['tokens_per_s'] / ceil['tokens_per_s']:.0%}; no engine can beat this HF by more than "
              f"{ceil['tokens_per_s'] / a['hf']['tokens_per_s']:.1f}x here")
    if b is not None:
        print()
        print(f"{'PPO phase':<16}{'seconds':>10}{'share':>9}")
        for p, sec in b["phases_s"].items():
            print(f"{p:<16}{sec:>10.3f}{sec / b['step_s']:>9.1%}")
        print(f"{'step':<16}{b['step_s']:>10.3f}")
        print(f"weight sync share of the step: {b['weight_sync_share']:.1%}  (target <= 10%; "
              f"{(b['weight_sync_bytes'] or 0) / 2**20:.1f} MiB per push, transport {args.ppo_transport})")
    for r in c or []:
        print()
        print(f"{'weight sync':<20}{'bucket MiB':>11}{'push s':>9}{'MiB':>8}{'ms/MiB':>9}")
        for name in ("object_store", "collective"):
            label = name + (" (gloo)" if name == "collective" else "")
            x = r[name]
            print(f"{label:<20}{r['bucket_mb']:>11g}{x['push_s']:>9.3f}{x['mib']:>8.1f}{x['ms_per_mib']:>9.2f}")
        x = r["collective"]
        print(f"ratio object_store / collective time per MiB: {r['ratio_object_store_over_collective']:.2f}x "
              f"(collective must not be slower: >= 1); collective's engine waited {x['engine_wait_s']:.3f}s for "
              f"bytes and spent {x['engine_load_s']:.3f}s loading them (vLLM reload_weights + checksum)")
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "rlhf.json").write_text(json.dumps({"preset": args.preset, "params": n_params, "args": vars(args),
                                                "rollout": a, "matmul_ceiling": ceil, "ppo_step": b,
                                                "weight_sync": c}, indent=2))
    print(f"saved {res / 'rlhf.json'}")


if __name__ == "__main__":
    main()
