"""Stage `reward-model`: a scalar reward head on the SFT decoder, trained on preference pairs (Ray Train + DeepSpeed).

`LlamaForSequenceClassification(num_labels=1)` initialised from the SFT model; the score is read at
the last non-pad token (HF does this from `pad_token_id`; sequences are right-padded and end with
EOS). Loss: -log sigmoid(r_chosen - r_rejected - margin) (InstructGPT's pairwise loss, with the
optional margin of Llama-2). Held-out pair accuracy is reported. The artifact is an HF directory the
RL `reward` role loads (and the `critic` may start from).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmray.config import check, to_dict
from llmray.errors import UserError
from llmray.train.loop import TrainTask
from llmray.train.trainer import TrainRunConfig


@dataclass(frozen=True)
class RewardModelConfig(TrainRunConfig):
    model: str = "artifacts/sft"
    """SFT model artifact the reward model starts from (its decoder; a fresh scalar head)."""
    data: str = "artifacts/corpus/preference"
    """JSONL: {"prompt": [messages], "chosen": str, "rejected": str} per line."""
    eval_fraction: float = 0.1
    seq_len: int = 256
    margin: float = 0.0
    """Subtracted from r_chosen - r_rejected in the loss: the pair must win by this much."""
    max_examples: int | None = None
    run_dir: str = "runs/reward_model"
    output: str = "artifacts/reward_model"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.eval_fraction < 1, "eval_fraction", "must be in [0, 1)")
        check(self.seq_len >= 8, "seq_len", "must be >= 8")
        check(self.margin >= 0, "margin", "must be >= 0")


def pairwise_loss(r_chosen, r_rejected, margin: float = 0.0):
    """Per-pair -log sigmoid(r_c - r_r - margin)."""
    import torch.nn.functional as F

    return -F.logsigmoid(r_chosen - r_rejected - margin)


def load_reward_model(path: str | Path):
    """(model, tokenizer) of a saved reward model, eval mode; `model(input_ids).logits[:, 0]` is the reward."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    return m.eval(), AutoTokenizer.from_pretrained(path)


@dataclass
class RewardTask(TrainTask):
    init_from: str
    margin: float = 0.0

    def build_model(self):
        import torch
        from transformers import AutoModelForSequenceClassification

        m = AutoModelForSequenceClassification.from_pretrained(self.init_from, num_labels=1, dtype=torch.float32)
        if m.config.pad_token_id is None:
            raise UserError(f"{self.init_from}: config has no pad_token_id (needed to find the last token)")
        return m

    def _rewards(self, engine, batch):
        import torch

        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        r = engine(input_ids=ids, use_cache=False).logits[:, 0].float()
        b = batch["chosen_ids"].shape[0]
        return r[:b], r[b:]

    def loss(self, engine, batch):
        rc, rr = self._rewards(engine, batch)
        losses = pairwise_loss(rc, rr, self.margin)
        sums = {"loss": float(losses.detach().sum()), "accuracy": float((rc > rr).float().sum()),
                "margin": float((rc - rr).detach().sum()), "count": float(rc.numel())}
        return losses.mean(), sums, int(batch["chosen_ids"].numel() * 2)

    def evaluate(self, engine, rows):
        from llmray.train.loop import to_batch

        return self.loss(engine, to_batch(rows))[1]

    def export(self, state_dict, out_dir: Path) -> None:
        from llmray.models.tokenizer import load_tokenizer

        m = self.build_model()
        m.load_state_dict(state_dict, strict=False)
        out_dir.mkdir(parents=True, exist_ok=True)
        m.save_pretrained(out_dir, safe_serialization=True)
        load_tokenizer(self.init_from).save_pretrained(out_dir)


def run(cfg: RewardModelConfig) -> dict:
    from llmray.cluster import init_ray
    from llmray.train.chat_data import columns, preference_rows, write_rows
    from llmray.train.loop import LoopSpec
    from llmray.train.sft import check_model_dir, load_tokenizer_checked, model_shape
    from llmray.train.trainer import check_memory, check_resume, finish, launch, small_dataset

    hf = check_model_dir(cfg.model)
    tok = load_tokenizer_checked(cfg.model, hf)
    shape = model_shape(hf)
    if cfg.seq_len > shape.max_position_embeddings:
        raise UserError(f"seq_len {cfg.seq_len} exceeds the model context ({shape.max_position_embeddings})")
    keep = ["chosen_ids", "rejected_ids"]
    train, held, stats = preference_rows(cfg.data, tok, cfg.seq_len, cfg.eval_fraction, cfg.max_examples)
    train = [{k: r[k] for k in keep} for r in train]
    held = [{k: r[k] for k in keep} for r in held]
    w = cfg.scaling.num_workers
    if len(train) < cfg.deepspeed.micro_batch_size * w:
        raise UserError(f"{cfg.data}: {len(train)} training pairs, fewer than micro_batch_size x num_workers")
    held = held[: len(held) // w * w]
    expect = {"model_shape": to_dict(shape), "head": "reward"}
    check_resume(cfg, expect)
    check_memory(cfg, shape, cfg.seq_len, copies=2)
    init_ray(cfg.ray)
    run_dir = Path(cfg.run_dir).resolve()
    ds = small_dataset(write_rows(train, run_dir / "data" / "train.parquet"), keep)
    spec = LoopSpec(
        task=RewardTask(init_from=str(Path(cfg.model).resolve()), margin=cfg.margin),
        ds=cfg.deepspeed, opt=cfg.optimizer, max_steps=cfg.max_steps, run_dir=str(run_dir), num_rows=len(train),
        every_n_steps=cfg.checkpoint.every_n_steps, keep_last=cfg.checkpoint.keep_last, resume=cfg.checkpoint.resume,
        seed=cfg.seed, log_every=cfg.log_every, flops_per_token=6.0 * shape.num_params(),
        peak_flops_per_worker=cfg.peak_flops_per_worker, expect_meta=expect,
        eval_rows=columns(held) if held else None,
    )
    print(f"[llmray] reward-model: {stats}", flush=True)
    result = launch(cfg, spec, ds, "reward-model")
    return finish(cfg, "reward-model", to_dict(cfg), result, [cfg.model], stats)
