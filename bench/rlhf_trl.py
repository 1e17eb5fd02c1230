"""GRPO benchmark: llmray (Ray worker groups, vLLM rollout engine, DeepSpeed actor) vs TRL's
GRPOTrainer (transformers generate, one process) at equal settings: the same SFT'd tiny model,
prompts, group size, generation length, learning rate, KL beta and number of updates.

TRL lives only in .venv-bench-trl (created by bench/trl_env.sh when missing: torch 2.13.0 CPU,
transformers 5.19, trl 1.16); it runs in a subprocess of that venv. Reported per side: mean step
time, generation time (TRL: its `_generate_and_score_completions`, which also scores and computes
reference log-probs; llmray: the vLLM generation phase), training time, and the ratios. Both
reward curves go into one PNG.

    python bench/rlhf_trl.py                      # 8 updates, 8 prompts x 4 samples x 16 tokens
    python bench/rlhf_trl.py --steps 4 --skip-trl
    python bench/rlhf_trl.py --preset small --max-tokens 32   # the pipeline's ~11M model
Results: bench/results/rlhf_trl[_small].json, bench/results/rlhf_trl[_small]_reward.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / ".venv-bench-trl"

TRL_SCRIPT = r'''
import json, sys, time, random
sys.path.insert(0, ROOT)
args = json.loads(sys.argv[1])
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from llmray.data import tasks   # stdlib-only module: the same rule reward as llmray

torch.manual_seed(args["seed"])
rows = [json.loads(l) for l in open(args["prompts"]) if l.strip()][: args["steps"] * args["prompts_per_step"]]
ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

def reward(prompts, completions, answer, **kw):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [tasks.reward(a, t) for a, t in zip(answer, texts)]

fields = set(GRPOConfig.__dataclass_fields__)
want = dict(output_dir=args["out"], learning_rate=args["lr"], num_generations=args["n"],
            per_device_train_batch_size=args["n"] * args["prompts_per_step"], gradient_accumulation_steps=1,
            max_completion_length=args["max_tokens"], max_steps=args["steps"], num_iterations=1,
            steps_per_generation=1, beta=args["beta"], temperature=1.0, top_p=1.0, logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=args["seed"],
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            scale_rewards="group", loss_type="dapo", shuffle_dataset=False, use_vllm=False,
            dataloader_num_workers=0, disable_tqdm=True)
cfg = GRPOConfig(**{k: v for k, v in want.items() if k in fields})
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(args["model"])
tok.padding_side = "left"

class Timed(GRPOTrainer):
    gen_s = []
    def _generate_and_score_completions(self, *a, **k):
        t = time.perf_counter(); out = super()._generate_and_score_completions(*a, **k)
        Timed.gen_s.append(time.perf_counter() - t); return out

steps = []
class CB(TrainerCallback):
    def on_step_begin(self, a, s, c, **k): self.t = time.perf_counter()
    def on_step_end(self, a, s, c, **k): steps.append(time.perf_counter() - self.t)

trainer = Timed(model=model, processing_class=tok, reward_funcs=reward, args=cfg, train_dataset=ds, callbacks=[CB()])
trainer.train()
hist = [h for h in trainer.state.log_history if "reward" in h]
print("RESULT " + json.dumps({"step_s": steps, "gen_s": Timed.gen_s, "reward": [h["reward"] for h in hist],
                              "trl": __import__("trl").__version__, "threads": torch.get_num_threads()}))
'''


def prepare(work: Path, sft_steps: int, preset: str = "tiny") -> tuple[Path, Path]:
    import importlib.util
    import random

    from llmray.data import tasks
    from llmray.models.factory import ModelConfig, build_model, save_pretrained
    from llmray.models.tokenizer import save_tokenizer, train_tokenizer

    def from_file(name: str, path: Path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    sft = work / "sft"
    if not (sft / "config.json").is_file():
        sample_texts = from_file("llmray_tests_conftest", ROOT / "tests" / "conftest.py").sample_texts
        quick_sft = from_file("llmray_rl_sft_setup", ROOT / "tests" / "rl" / "sft_setup.py").quick_sft
        tok = train_tokenizer(sample_texts(), vocab_size=1024)
        save_tokenizer(tok, work / "tokenizer")
        save_pretrained(build_model(ModelConfig(preset=preset), tok, seed=0), tok, work / "base")
        print(f"SFT of the {preset} model ({sft_steps} steps, setup shared by both sides)...", flush=True)
        quick_sft(work / "base", sft, steps=sft_steps)
    prompts = work / "corpus" / "prompts"
    if not prompts.is_dir():
        prompts.mkdir(parents=True)
        rng = random.Random(1)
        with (prompts / "part-00000.jsonl").open("w") as f:
            for _ in range(1024):
                f.write(json.dumps(tasks.prompt_record(tasks.make_task(rng))) + "\n")
    return sft, prompts


def run_llmray(sft: Path, prompts: Path, work: Path, a) -> dict:
    import shutil

    from llmray.cluster import RayConfig, init_ray
    from llmray.config import load
    from llmray.report.metrics import read_metrics
    from llmray.rl.config import RLConfig
    from llmray.stages.ppo import run

    init_ray(RayConfig(num_cpus=4))
    run_dir = work / "llmray_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    # Same prompt file as TRL; llmray draws from it in its seeded order, TRL in file order.
    cfg = load(RLConfig, None, [
        f"model={sft}", f"prompts={prompts}", f"run_dir={run_dir}", f"output={work / 'llmray_model'}",
        f"steps={a.steps}", "eval_every=-1", "save_model=false", "checkpoint.every_n_steps=100000",
        "algo.algorithm=grpo", f"algo.n_samples={a.n}", f"algo.prompts_per_step={a.prompts_per_step}",
        f"algo.minibatch_size={a.n * a.prompts_per_step}", "algo.epochs=1", f"algo.kl_coef={a.beta}",
        "algo.kl_in_reward=false", f"rollout.max_tokens={a.max_tokens}", "rollout.max_model_len=128",
        "rollout.dtype=float32", f"actor.optimizer.lr={a.lr}", "actor.optimizer.grad_clip=1.0",
        "rollout.cpus_per_worker=1", "actor.cpus_per_worker=1", "ref.cpus_per_worker=0.5", "reward.cpus_per_worker=0.5",
        f"seed={a.seed}",
    ])
    t = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "time/step_s" in r]
    return {"wall_s": wall, "step_s": [r["time/step_s"] for r in rows], "gen_s": [r["time/generation_s"] for r in rows],
            "reward": [r["rollout/reward_mean"] for r in rows]}


def run_trl(sft: Path, prompts: Path, work: Path, a) -> dict:
    if not (TRL_VENV / "bin" / "python").is_file():
        print("creating .venv-bench-trl (bench/trl_env.sh)...", flush=True)
        subprocess.run(["bash", str(ROOT / "bench" / "trl_env.sh")], check=True)
    script = work / "trl_grpo.py"
    script.write_text(f"ROOT = {str(ROOT)!r}\n" + TRL_SCRIPT)
    args = {"model": str(sft), "prompts": str(next(prompts.glob("*.jsonl"))), "out": str(work / "trl_out"),
            "lr": a.lr, "n": a.n, "prompts_per_step": a.prompts_per_step, "max_tokens": a.max_tokens,
            "steps": a.steps, "beta": a.beta, "seed": a.seed}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    t = time.perf_counter()
    p = subprocess.run([str(TRL_VENV / "bin" / "python"), str(script), json.dumps(args)], capture_output=True,
                       text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"TRL run failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(line[len("RESULT "):])}


def summary(r: dict) -> dict:
    use = slice(1, None) if len(r["step_s"]) > 1 else slice(None)  # step 1 carries warm-up
    step = statistics.mean(r["step_s"][use])
    gen = statistics.mean(r["gen_s"][use])
    return {"step_s": step, "generation_s": gen, "training_s": step - gen}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="group size (generations per prompt)")
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"],
                    help="model preset (llmray.models.factory): tiny ~1M, small ~11M parameters")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--work", default=None, help="default: .cache/bench_rlhf_trl[_<preset>]")
    a = ap.parse_args()
    tag = "" if a.preset == "tiny" else f"_{a.preset}"
    work = Path(a.work or ROOT / ".cache" / f"bench_rlhf_trl{tag}")
    work.mkdir(parents=True, exist_ok=True)
    sft, prompts = prepare(work, a.sft_steps, a.preset)
    print(f"GRPO on the {a.preset} model: {a.steps} updates, {a.prompts_per_step} prompts x {a.n} samples x "
          f"{a.max_tokens} tokens, "
          f"lr {a.lr}, beta {a.beta}", flush=True)
    print("llmray ...", flush=True)
    ours = run_llmray(sft, prompts, work, a)
    theirs = None
    if not a.skip_trl:
        print("TRL GRPOTrainer ...", flush=True)
        theirs = run_trl(sft, prompts, work, a)
    s_ours = summary(ours)
    print()
    print(f"{'':<22}{'step s':>10}{'generation s':>14}{'training s':>12}{'reward first->last':>22}")
    print(f"{'llmray (vLLM+DS)':<22}{s_ours['step_s']:>10.2f}{s_ours['generation_s']:>14.2f}"
          f"{s_ours['training_s']:>12.2f}"
          f"{ours['reward'][0]:>12.3f} -> {ours['reward'][-1]:.3f}")
    result = {"settings": vars(a), "llmray": {**ours, **s_ours}}
    if theirs:
        s_t = summary(theirs)
        print(f"{'TRL ' + theirs['trl']:<22}{s_t['step_s']:>10.2f}{s_t['generation_s']:>14.2f}"
              f"{s_t['training_s']:>12.2f}"
              f"{theirs['reward'][0]:>12.3f} -> {theirs['reward'][-1]:.3f}")
        ratios = {k: s_t[k] / s_ours[k] for k in ("step_s", "generation_s", "training_s") if s_ours[k] > 0}
        print(f"speed-up llmray vs TRL: step {ratios['step_s']:.2f}x, generation {ratios.get('generation_s', 0):.2f}x, "
              f"training {ratios.get('training_s', 0):.2f}x  (target >= 1.5x per step)")
        result.update({"trl": {**theirs, **s_t}, "speedup": ratios})
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    from llmray.report.plots import plot_curves

    curves = {"llmray GRPO": list(enumerate(ours["reward"], 1))}
    if theirs:
        curves["TRL GRPOTrainer"] = list(enumerate(theirs["reward"], 1))
    png, out = res / f"rlhf_trl{tag}_reward.png", res / f"rlhf_trl{tag}.json"
    plot_curves(curves, png, f"GRPO mean reward per update ({a.preset} model)", ylabel="reward")
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out} and {png}")


if __name__ == "__main__":
    main()
