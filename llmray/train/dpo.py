"""Stage `dpo`: direct preference optimisation, offline, on Ray Train + DeepSpeed, against a frozen reference.

Loss (Rafailov et al. 2023): -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)))),
with optional label smoothing (conservative DPO). Log-probabilities are sums over the answer's tokens
(assistant mask, EOS included). The reference never changes, so its log-probabilities are computed
ONCE, in a Ray task before training, and cached next to the run's data (keyed by the reference
weights and the data); training rows carry them as columns. Held-out preference accuracy and
implicit reward margins (beta x log-ratio differences) are reported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from llmray.config import check, to_dict
from llmray.errors import UserError
from llmray.train.loop import TrainTask
from llmray.train.trainer import TrainRunConfig


@dataclass(frozen=True)
class DPOConfig(TrainRunConfig):
    model: str = "artifacts/sft"
    """Policy start (usually the SFT model artifact)."""
    ref_model: str | None = None
    """Frozen reference; default: the same as `model`."""
    data: str = "artifacts/corpus/preference"
    """JSONL: {"prompt": [messages], "chosen": str, "rejected": str} per line."""
    beta: float = 0.1
    """Strength of the KL anchor to the reference (higher = stay closer)."""
    label_smoothing: float = 0.0
    """Probability that a pair's label is flipped (cDPO); 0 = plain DPO."""
    eval_fraction: float = 0.1
    seq_len: int = 256
    max_examples: int | None = None
    run_dir: str = "runs/dpo"
    output: str = "artifacts/dpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        check(0 <= self.eval_fraction < 1, "eval_fraction", "must be in [0, 1)")
        check(self.seq_len >= 8, "seq_len", "must be >= 8")


def sequence_logps(logits, labels):
    """Sum of log p(label) over labelled positions per sequence (labels aligned with inputs; -100 = skip)."""
    import torch

    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != -100
    safe = labels.clamp(min=0)
    lp = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0):
    """(per-pair loss, chosen implicit reward, rejected implicit reward)."""
    import torch.nn.functional as F

    logits = beta * ((pc - rc) - (pr - rr))
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, beta * (pc - rc).detach(), beta * (pr - rr).detach()


@dataclass
class DPOTask(TrainTask):
    init_from: str
    beta: float = 0.1
    label_smoothing: float = 0.0

    def build_model(self):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.init_from, dtype=torch.float32)

    def loss(self, engine, batch):
        import torch

        b = batch["chosen_ids"].shape[0]
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        lp = sequence_logps(engine(input_ids=ids, use_cache=False).logits, labels)
        pc, pr = lp[:b], lp[b:]
        rc, rr = batch["ref_chosen"].float(), batch["ref_rejected"].float()
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, self.beta, self.label_smoothing)
        sums = {"loss": float(losses.detach().sum()), "accuracy": float((cr > rj).float().sum()),
                "reward_margin": float((cr - rj).detach().sum()), "chosen_reward": float(cr.detach().sum()),
                "rejected_reward": float(rj.detach().sum()), "count": float(b)}
        return losses.mean(), sums, int(ids.numel())

    def evaluate(self, engine, rows):
        from llmray.train.loop import to_batch

        return self.loss(engine, to_batch(rows))[1]

    def export(self, state_dict, out_dir: Path) -> None:
        from llmray.models.factory import save_pretrained
        from llmray.models.tokenizer import load_tokenizer

        m = self.build_model()
        m.load_state_dict(state_dict, strict=False)
        save_pretrained(m, load_tokenizer(self.init_from), out_dir)


def _ref_logps_task(ref_dir: str, rows_file: str, out_file: str, batch_size: int = 8) -> int:
    """Reference log-probs of every pair (run once, as a Ray task); written as a parquet beside the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    t = pq.read_table(rows_file)
    cols = {k: t.column(k).to_pylist() for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")}
    rc, rr = [], []
    with torch.no_grad():
        for i in range(0, t.num_rows, batch_size):
            for side, acc in (("chosen", rc), ("rejected", rr)):
                ids = torch.tensor(cols[f"{side}_ids"][i:i + batch_size])
                lab = torch.tensor(cols[f"{side}_labels"][i:i + batch_size])
                acc.extend(sequence_logps(model(input_ids=ids, use_cache=False).logits, lab).tolist())
    pq.write_table(t.append_column("ref_chosen", pa.array(rc, pa.float64())).append_column(
        "ref_rejected", pa.array(rr, pa.float64())), out_file)
    return t.num_rows


def ref_cache_key(ref_dir: str | Path, rows: list[dict]) -> str:
    h = hashlib.sha256()
    for f in ("config.json", "model.safetensors"):
        p = Path(ref_dir) / f
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    h.update(json.dumps(rows, sort_keys=True).encode())
    return h.hexdigest()[:16]


def with_ref_logps(ref_dir: str, rows: list[dict], data_dir: Path, name: str) -> tuple[Path, bool]:
    """Parquet of `rows` plus ref_chosen / ref_rejected; computed once per (reference, data), then reused."""
    import ray

    from llmray.train.chat_data import write_rows

    key = ref_cache_key(ref_dir, rows)
    out = data_dir / f"{name}-ref-{key}.parquet"
    if out.is_file():
        return out, True
    src = write_rows(rows, data_dir / f"{name}.parquet")
    tmp = out.with_name(out.name + ".tmp")
    ray.get(ray.remote(num_cpus=1)(_ref_logps_task).remote(str(ref_dir), str(src), str(tmp)))
    tmp.rename(out)
    return out, False


def run(cfg: DPOConfig) -> dict:
    import pyarrow.parquet as pq

    from llmray.cluster import init_ray
    from llmray.train.chat_data import preference_rows
    from llmray.train.loop import LoopSpec
    from llmray.train.sft import check_model_dir, load_tokenizer_checked, model_shape
    from llmray.train.trainer import check_memory, check_resume, finish, launch, small_dataset

    hf = check_model_dir(cfg.model)
    ref_dir = cfg.ref_model or cfg.model
    ref_hf = check_model_dir(ref_dir, "ref_model")
    if ref_hf["vocab_size"] != hf["vocab_size"]:
        raise UserError(f"ref_model {ref_dir} has vocab_size {ref_hf['vocab_size']} but model {cfg.model} has "
                        f"{hf['vocab_size']}; the reference must share the policy's tokenizer")
    tok = load_tokenizer_checked(cfg.model, hf)
    shape = model_shape(hf)
    if cfg.seq_len > shape.max_position_embeddings:
        raise UserError(f"seq_len {cfg.seq_len} exceeds the model context ({shape.max_position_embeddings})")
    train, held, stats = preference_rows(cfg.data, tok, cfg.seq_len, cfg.eval_fraction, cfg.max_examples)
    w = cfg.scaling.num_workers
    if len(train) < cfg.deepspeed.micro_batch_size * w:
        raise UserError(f"{cfg.data}: {len(train)} training pairs, fewer than micro_batch_size x num_workers")
    held = held[: len(held) // w * w]
    expect = {"model_shape": to_dict(shape), "objective": "dpo"}
    check_resume(cfg, expect)
    check_memory(cfg, shape, cfg.seq_len, copies=2)

    init_ray(cfg.ray)
    run_dir = Path(cfg.run_dir).resolve()
    ref_abs = str(Path(ref_dir).resolve())
    train_file, cached = with_ref_logps(ref_abs, train, run_dir / "data", "train")
    eval_rows = None
    if held:
        eval_file, _ = with_ref_logps(ref_abs, held, run_dir / "data", "eval")
        t = pq.read_table(eval_file)
        import numpy as np

        eval_rows = {c: np.asarray(t.column(c).to_pylist()) for c in t.column_names}
    stats["ref_logps_cached"] = cached
    cols = ["chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "ref_chosen", "ref_rejected"]
    ds = small_dataset(train_file, cols)
    spec = LoopSpec(
        task=DPOTask(init_from=str(Path(cfg.model).resolve()), beta=cfg.beta, label_smoothing=cfg.label_smoothing),
        ds=cfg.deepspeed, opt=cfg.optimizer, max_steps=cfg.max_steps, run_dir=str(run_dir), num_rows=len(train),
        every_n_steps=cfg.checkpoint.every_n_steps, keep_last=cfg.checkpoint.keep_last, resume=cfg.checkpoint.resume,
        seed=cfg.seed, log_every=cfg.log_every, flops_per_token=6.0 * shape.num_params(),
        peak_flops_per_worker=cfg.peak_flops_per_worker, expect_meta=expect, eval_rows=eval_rows,
    )
    print(f"[llmray] dpo: {stats}", flush=True)
    result = launch(cfg, spec, ds, "dpo")
    return finish(cfg, "dpo", to_dict(cfg), result, [cfg.model] + ([ref_dir] if cfg.ref_model else []), stats)
