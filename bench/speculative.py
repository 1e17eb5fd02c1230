"""Speculative decoding benchmark: the draft stage on make run's RL model, then one side-by-side table on the
vLLM engine that serves: plain vs n-gram vs the trained draft vs an untrained (random) draft of the same
shape, output tok/s at concurrency 1, 8 and 32 with the ratio to plain, acceptance rate and whether greedy
outputs equal plain's. Held-out prompts are the stage's gate prompts (task chat prompts and document
prefixes seeded apart from its training data); each request decodes `gate.max_tokens` tokens (ignore_eos).

    # after `make run` (reads runs/default/rl, writes the draft under .cache/bench_speculative)
    .venv/bin/python bench/speculative.py                      # JSON -> bench/results/speculative.json
    .venv/bin/python bench/speculative.py --target DIR train.steps=600 num_layers=2 gate.num_speculative_tokens=4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
WORK = ROOT / ".cache" / "bench_speculative"
CONFIG = ROOT / "jobs" / "configs" / "draft" / "tiny_cpu.yaml"
CONCURRENCY = (1, 8, 32)


def table(results: dict[str, dict]) -> str:
    plain = results["plain"]
    cols = " | ".join(f"tok/s c={c} | x plain" for c in CONCURRENCY)
    head = f"| variant | {cols} | acceptance | greedy = plain |"
    lines = [head, "|" + "---|" * (2 + 2 * len(CONCURRENCY) + 1)]
    for name, r in results.items():
        cells = []
        for c in CONCURRENCY:
            v, p = r["tok_s"][str(c)], plain["tok_s"][str(c)]
            cells += [f"{v:.1f}", f"{v / p:.2f}x"]
        acc = "-" if r.get("acceptance_rate") is None else f"{r['acceptance_rate']:.3f}"
        same = "yes" if r.get("answers") == plain.get("answers") else "NO"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {acc} | {same} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=str(ROOT / "runs" / "default" / "rl"), help="target model directory")
    ap.add_argument("--min-requests", type=int, default=8, help="requests per concurrency level (at least c)")
    ap.add_argument("overrides", nargs="*", help="draft stage overrides, key.sub=value")
    args = ap.parse_args(argv)

    from dataclasses import replace

    from llmray.config import load
    from llmray.models.draft import build_draft, save_draft
    from llmray.models.factory import load_pretrained
    from llmray.serving.probe import probe
    from llmray.stages.draft import DraftConfig, engine, probe_spec, run

    cfg = load(DraftConfig, CONFIG, [f"model={args.target}", f"output={WORK / 'draft'}", "force=true",
                                     *args.overrides])
    t0 = time.monotonic()
    stage = run(cfg)
    print(f"[bench] draft stage: {stage['elapsed_s']} s, loss {stage['loss_first10']} -> {stage['loss_last10']}, "
          f"gate -> {stage['speculative']['method']}", flush=True)
    target, tok = load_pretrained(cfg.model)
    random_dir = save_draft(build_draft(target, cfg.num_layers, "random", seed=1), cfg.model, WORK / "random")
    spec = replace(probe_spec(cfg, tok), concurrencies=CONCURRENCY, min_requests=args.min_requests)
    variants = {"plain": (cfg.model, engine(cfg)), "ngram": (cfg.model, engine(cfg, "ngram")),
                "draft (trained)": (cfg.model, engine(cfg, "draft", cfg.output)),
                "draft (random)": (cfg.model, engine(cfg, "draft", random_dir))}
    results = probe(variants, spec)
    print(f"\nTarget {cfg.model} ({stage['target_params'] / 1e6:.1f}M params); draft: {cfg.num_layers} layer(s), "
          f"{stage['params'] / 1e6:.1f}M params, {cfg.train.steps} steps on {stage['generated_tokens']} generated "
          f"tokens; k={cfg.gate.num_speculative_tokens}; {len(spec.prompts)} held-out prompts x "
          f"{spec.speed_tokens} tokens\n")
    print(table(results))
    ratio = results["draft (trained)"]["tok_s"]["1"] / results["plain"]["tok_s"]["1"]
    print(f"\ntrained draft at c=1: {ratio:.2f}x plain (issue target >= 1.5x); stage gate at c="
          f"{cfg.gate.concurrency}: {stage['speculative']['method']}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "speculative.json").write_text(json.dumps(
        {"stage": stage, "probe": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in results.items()},
         "elapsed_s": round(time.monotonic() - t0, 1)}, indent=2))
    print(f"-> {OUT / 'speculative.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
