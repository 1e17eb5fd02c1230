"""Stage `draft`: train a draft model for speculative decoding by distilling the target on its own
generations, then gate speculation (draft or n-gram) on the vLLM engine that serves.

Local:   llmray draft --config jobs/configs/draft/tiny_cpu.yaml model=runs/default/rl
Cluster: ray job submit --working-dir . -- python jobs/draft.py --config jobs/configs/draft/tiny_cpu.yaml

Data: vLLM continuations of the target (greedy, plus `data.sampled` sampled ones) over task chat prompts
and document prefixes, seeded apart from evaluation. Draft: the target's embeddings, final norm, LM head and
first `num_layers` decoder layers (layer-skip init), then CE on the target's tokens + KL to its logits.
Layer-skip is the default because it starts from the target's own token statistics: on the `small` RL model
its first loss is far below a fresh model's, and at the same steps it accepts more (`init: random` builds
the fresh model of the same shape, the baseline of tests and bench/speculative.py).
Gate (`llmray.serving.probe`): plain / draft / n-gram on held-out prompts at `gate.concurrency`; the
fastest candidate with greedy outputs identical to plain and speedup >= `gate.min_speedup` is enabled
(else none) and recorded as manifest metrics `speculative` for the serve stage.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmray import artifacts
from llmray.config import check, to_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftDataConfig:
    prompts: int = 256
    """Task chat prompts (chat template, generation prompt opened) the target continues."""
    documents: int = 256
    """Document prefixes the target continues (synthetic documents, or `texts`)."""
    texts: str | None = None
    """Optional corpus artifact or JSONL/Parquet directory of documents instead of synthetic ones."""
    prefix_tokens: int = 32
    """Longest document prefix (each prefix is 8..prefix_tokens tokens)."""
    max_new_tokens: int = 96
    """Tokens the target generates per prompt (past EOS, as the speed probe decodes)."""
    sampled: int = 1
    """Sampled (temperature 1) continuations per prompt besides the greedy one."""
    seed: int = 2029
    """Seed of the prompts and documents: apart from evaluation's and the gate's (seed + 1)."""

    def __post_init__(self) -> None:
        check(self.prompts >= 0, "data.prompts", "must be >= 0")
        check(self.documents >= 0, "data.documents", "must be >= 0")
        check(self.prompts + self.documents >= 1, "data.prompts", "data.prompts + data.documents must be >= 1")
        check(self.prefix_tokens >= 8, "data.prefix_tokens", "must be >= 8")
        check(self.max_new_tokens >= 1, "data.max_new_tokens", "must be >= 1")
        check(self.sampled >= 0, "data.sampled", "must be >= 0")


@dataclass(frozen=True)
class DraftTrainConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    kl_weight: float = 1.0
    """Weight of KL(target || draft) on the generated positions; 0: CE on the target's tokens only."""
    seed: int = 0
    threads: int = 0
    """torch intra-op threads for distillation; 0: torch's default (every core). 1 keeps it from
    oversubscribing cores that other work on the node is using."""

    def __post_init__(self) -> None:
        check(self.threads >= 0, "train.threads", "must be >= 0")
        check(self.steps >= 1, "train.steps", "must be >= 1")
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.lr > 0, "train.lr", "must be > 0")
        check(self.kl_weight >= 0, "train.kl_weight", "must be >= 0")


@dataclass(frozen=True)
class DraftGateConfig:
    concurrency: int = 1
    """The serving concurrency the speedup is measured at."""
    min_speedup: float = 1.1
    """Enable a candidate only at >= this x plain output tok/s (and identical greedy outputs)."""
    num_speculative_tokens: int = 3
    """Tokens proposed per step (draft and n-gram)."""
    candidates: list[str] = ("draft", "ngram")
    prompts: int = 16
    """Held-out prompts (half task chat prompts, half document prefixes): greedy answers and throughput."""
    max_tokens: int = 64
    """Tokens decoded per request for the greedy comparison and for tok/s."""
    min_requests: int = 8
    model: str | None = None
    """The model that will serve with the speculation (e.g. the quantized target; same tokenizer), if not
    `model`: the gate measures plain and speculative decoding on it."""

    def __post_init__(self) -> None:
        check(self.concurrency >= 1, "gate.concurrency", "must be >= 1")
        check(self.min_speedup > 0, "gate.min_speedup", "must be > 0")
        check(1 <= self.num_speculative_tokens <= 16, "gate.num_speculative_tokens", "must be in [1, 16]")
        bad = [c for c in self.candidates if c not in ("draft", "ngram")]
        check(not bad, "gate.candidates", f"unknown {bad}; allowed: draft, ngram")
        check(self.prompts >= 2, "gate.prompts", "must be >= 2")
        check(self.max_tokens >= 4, "gate.max_tokens", "must be >= 4")
        check(self.min_requests >= 1, "gate.min_requests", "must be >= 1")


@dataclass(frozen=True)
class DraftConfig:
    model: str = "artifacts/model"
    """Target model: HF directory with its tokenizer (e.g. the RL stage's output)."""
    output: str = "artifacts/draft"
    num_layers: int = 1
    """Draft depth (decoder layers); hidden size and vocabulary are the target's."""
    init: Literal["target_layers", "random"] = "target_layers"
    """target_layers: the target's first `num_layers` layers + embeddings/norm/head; random: fresh weights."""
    data: DraftDataConfig = field(default_factory=DraftDataConfig)
    train: DraftTrainConfig = field(default_factory=DraftTrainConfig)
    gate: DraftGateConfig = field(default_factory=DraftGateConfig)
    max_model_len: int = 512
    kv_cache_gb: float = 1.0
    force: bool = False
    """Rebuild even if a complete output exists."""

    def __post_init__(self) -> None:
        check(self.num_layers >= 1, "num_layers", "must be >= 1")
        check(self.max_model_len >= 64, "max_model_len", "must be >= 64")
        need = max(self.data.prefix_tokens + self.data.max_new_tokens, 96 + self.gate.max_tokens)
        check(need <= self.max_model_len, "max_model_len",
              f"must hold a prompt and its continuation ({need} tokens)")


Config = DraftConfig


def _chat_prompts(tok, n: int, seed: int, exclude: int = 0) -> list[list[int]]:
    """`n` task chat prompts, none of them among the first `exclude` prompts of seed - 1 (the training ones)."""
    from llmray.data import tasks

    seen = set()
    if exclude:
        rng = random.Random(seed - 1)
        seen = {tasks.make_task(rng).prompt for _ in range(exclude)}
    rng = random.Random(seed)
    out = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        t = tasks.make_task(rng)
        if t.prompt in seen:
            continue
        msgs = tasks.prompt_record(t)["prompt"]
        out.append(list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"]))
    return out


def _doc_prefixes(tok, n: int, seed: int, prefix_tokens: int, texts: str | None, skip: int = 0) -> list[list[int]]:
    """`n` document prefixes of 8..prefix_tokens tokens (the `skip` first documents are left to others)."""
    rng = random.Random(seed)
    if texts:
        from llmray.errors import UserError
        from llmray.models.tokenizer import iter_texts

        from itertools import islice

        docs = list(islice(iter_texts(texts), skip, skip + n))
        if len(docs) < n:
            raise UserError(f"data.texts: {len(docs)} documents after the first {skip} in {texts}, need {n}")
    else:
        from llmray.data import synthetic

        docs = [synthetic.document(rng) for _ in range(n)]
    return [tok(d)["input_ids"][: rng.randint(8, prefix_tokens)] for d in docs]


def held_out_prompts(cfg: DraftConfig, tok) -> list[list[int]]:
    """The gate's prompts: task chat prompts (none seen in training) and document prefixes, seeded apart from
    the training data."""
    g, d = cfg.gate, cfg.data
    n_chat = g.prompts // 2
    return (_chat_prompts(tok, n_chat, d.seed + 1, exclude=d.prompts)
            + _doc_prefixes(tok, g.prompts - n_chat, d.seed + 1, d.prefix_tokens, d.texts, skip=d.documents))


def probe_spec(cfg: DraftConfig, tok):
    """What the gate measures (tests and bench/speculative.py measure other drafts with the same spec)."""
    from llmray.serving.probe import ProbeSpec

    prompts = held_out_prompts(cfg, tok)
    return ProbeSpec(prompts=prompts, max_answer_tokens=cfg.gate.max_tokens, speed_prompts=prompts,
                     concurrencies=(cfg.gate.concurrency,), speed_tokens=cfg.gate.max_tokens,
                     min_requests=cfg.gate.min_requests)


def engine(cfg: DraftConfig, method: str = "none", draft_model: str | None = None, k: int | None = None) -> dict:
    """EngineConfig mapping of the plain engine or of one speculative variant."""
    eng = {"max_model_len": cfg.max_model_len, "kv_cache_gb": cfg.kv_cache_gb}
    if method == "draft":
        eng["speculative"] = {"method": "draft", "draft_model": str(draft_model),
                              "num_speculative_tokens": k or cfg.gate.num_speculative_tokens}
    elif method == "ngram":
        eng["speculative"] = {"method": "ngram", "num_speculative_tokens": k or cfg.gate.num_speculative_tokens}
    return eng


def generate_data(cfg: DraftConfig, tok) -> list[tuple[list[int], int]]:
    """(prompt + the target's continuation, prompt length) pairs from a vLLM engine in a child process."""
    from llmray.serving.offline import generate, in_child

    d = cfg.data
    prompts = (_chat_prompts(tok, d.prompts, d.seed)
               + _doc_prefixes(tok, d.documents, d.seed, d.prefix_tokens, d.texts))
    outs = in_child(generate, cfg.model, engine(cfg), prompts, d.max_new_tokens, d.sampled, d.seed)
    owners = list(range(len(prompts))) + [i for i in range(len(prompts)) for _ in range(d.sampled)]
    return [(prompts[i] + o, len(prompts[i])) for i, o in zip(owners, outs) if o]


def run(cfg: DraftConfig, progress=None) -> dict:
    """Generate, distil, gate, publish (the draft is published whatever the gate decides; `speculative`
    says whether to use it)."""
    from llmray.models.draft import build_draft, distil, save_draft
    from llmray.models.factory import load_pretrained
    from llmray.models.model_dir import check_model_dir
    from llmray.serving.gates import speculative_decision
    from llmray.serving.probe import engine_process, probe
    from llmray.serving.speculative import check_draft_tokenizer

    say = progress or log.info
    check_model_dir(cfg.model)
    if cfg.gate.model:
        check_model_dir(cfg.gate.model, "gate.model")
    out = Path(cfg.output).resolve()
    if artifacts.is_complete(out, "model") and not cfg.force:
        m = artifacts.read_manifest(out)
        return {"output": str(out), "skipped": "complete artifact exists (force=true rebuilds)", **m.metrics}
    t0 = time.monotonic()
    target, tok = load_pretrained(cfg.model)
    check(cfg.num_layers <= target.config.num_hidden_layers, "num_layers",
          f"must be <= the target's {target.config.num_hidden_layers} layers")
    # The generation engine and the gate's engines share one spawned process (vLLM imported once); it idles
    # while the draft trains here.
    with engine_process():
        say(f"[draft] target {cfg.model}: generating continuations of {cfg.data.prompts} prompts and "
            f"{cfg.data.documents} document prefixes (greedy + {cfg.data.sampled} sampled each)")
        seqs = generate_data(cfg, tok)
        t_gen = time.monotonic() - t0
        gen_tokens = sum(len(s) - n for s, n in seqs)
        say(f"[draft] {len(seqs)} sequences, {gen_tokens} generated tokens in {t_gen:.1f}s")
        draft = build_draft(target, cfg.num_layers, cfg.init, seed=cfg.train.seed)
        tr = cfg.train
        losses = distil(draft, target, seqs, tr.steps, tr.batch_size, tr.lr, tr.kl_weight, tok.pad_token_id,
                        seed=tr.seed, progress=say, threads=tr.threads)
        t_train = time.monotonic() - t0 - t_gen
        k = min(10, len(losses))
        metrics = {"num_layers": cfg.num_layers, "init": cfg.init,
                   "params": sum(p.numel() for p in draft.parameters()),
                   "target_params": sum(p.numel() for p in target.parameters()),
                   "sequences": len(seqs), "generated_tokens": gen_tokens, "steps": tr.steps,
                   "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                   "loss_first10": round(sum(losses[:k]) / k, 4), "loss_last10": round(sum(losses[-k:]) / k, 4),
                   "generate_s": round(t_gen, 1), "train_s": round(t_train, 1)}
        with artifacts.publish(out) as tmp:
            save_draft(draft, cfg.model, tmp)
            served = cfg.gate.model or cfg.model
            check_draft_tokenizer(served, tmp)
            variants = {"plain": (served, engine(cfg))}
            for c in cfg.gate.candidates:
                variants[c] = (served, engine(cfg, c, tmp))
            results = probe(variants, probe_spec(cfg, tok), progress=say)
            decision = speculative_decision(results, cfg.gate.concurrency, cfg.gate.min_speedup,
                                            cfg.gate.num_speculative_tokens, str(out))
            say(f"[draft] gate at concurrency {cfg.gate.concurrency}: tok/s {decision['tok_s']}, acceptance "
                f"{decision['acceptance_rate']}, identical {decision['identical']} -> {decision['method']}")
            metrics.update(speculative=decision, elapsed_s=round(time.monotonic() - t0, 1))
            inputs = [cfg.model] if artifacts.is_complete(cfg.model) else []
            artifacts.write_manifest(tmp, "model", "llmray.stages.draft", to_dict(cfg), metrics, inputs)
        return {"output": str(out), **metrics}
