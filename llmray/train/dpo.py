"""The DPO training task: direct preference optimisation, offline, against a frozen reference.

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

from llmray.train.loop import TrainTask


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

        return self.loss(engine, to_batch(rows, engine.device))[1]

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
