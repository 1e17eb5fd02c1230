"""Stage `pretrain`: a decoder trained from scratch on packed shards with Ray Train + DeepSpeed ZeRO.

Local:   llmray pretrain --config jobs/configs/pretrain/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain/1b_zero3.yaml

Reads the `pack` stage's dataset artifact (`shards/part-*.parquet`, `input_ids` of exactly seq_len
tokens, optional `position_ids`) and its tokenizer; checks everything before launch (dataset,
vocabulary, context length, memory, resumable checkpoint); publishes a `model` artifact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from llmray.config import to_dict
from llmray.errors import UserError
from llmray.models.factory import ModelConfig
from llmray.train.trainer import TrainRunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig(TrainRunConfig):
    dataset: str = "artifacts/dataset"
    """Packed dataset artifact (kind `dataset`) from the `pack` stage."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the one named in the dataset's manifest."""
    model: ModelConfig = field(default_factory=ModelConfig)
    run_dir: str = "runs/pretrain"
    output: str = "artifacts/pretrained"


Config = PretrainConfig


def shard_files(dataset: str | Path) -> list[Path]:
    return sorted(Path(dataset).glob("shards/part-*.parquet"))


def inspect_dataset(dataset: str | Path) -> dict:
    """Manifest facts plus row count and columns of the packed shards; clear errors for what is wrong."""
    import pyarrow.parquet as pq

    from llmray import artifacts

    d = Path(dataset)
    if not d.exists():
        raise UserError(f"dataset: {d} does not exist (run the `pack` stage first)")
    man = artifacts.require(d, "dataset")
    files = shard_files(d)
    if not files:
        raise UserError(f"dataset: {d} has no shards/part-*.parquet files")
    rows, seq_len, columns = 0, None, None
    for f in files:
        meta = pq.ParquetFile(f)
        rows += meta.metadata.num_rows
        names = meta.schema_arrow.names
        if "input_ids" not in names:
            raise UserError(f"dataset: {f} has no input_ids column (columns: {', '.join(names)})")
        columns = [c for c in ("input_ids", "position_ids") if c in names]
        if seq_len is None and meta.metadata.num_rows:
            first = meta.read_row_group(0, columns=["input_ids"]).column(0)[0].as_py()
            seq_len = len(first)
    if rows == 0:
        raise UserError(f"dataset: {d} is empty (0 sequences in {len(files)} shards)")
    m_seq = man.metrics.get("seq_len")
    if m_seq is not None and seq_len is not None and int(m_seq) != seq_len:
        raise UserError(f"dataset: {d} manifest says seq_len={m_seq} but the shards hold {seq_len}-token rows")
    return {"files": files, "rows": rows, "seq_len": seq_len, "columns": columns, "manifest": man}


def prepare(cfg: PretrainConfig):
    """All pre-launch checks; returns what the launch needs or raises UserError naming the problem."""
    from llmray.models.tokenizer import load_tokenizer
    from llmray.train.trainer import check_memory, check_resume

    info = inspect_dataset(cfg.dataset)
    man = info["manifest"]
    tok_dir = cfg.tokenizer or man.config.get("tokenizer") or man.metrics.get("tokenizer")
    if not tok_dir:
        raise UserError(f"tokenizer: not set and the dataset manifest of {cfg.dataset} names none; set tokenizer=<dir>")
    if not Path(tok_dir).exists():
        raise UserError(f"tokenizer: {tok_dir} does not exist")
    tok_dir = str(Path(tok_dir).resolve())  # the workers run in their own directories
    tok = load_tokenizer(tok_dir)
    d_vocab = man.metrics.get("vocab_size")
    if d_vocab is not None and int(d_vocab) != len(tok):
        raise UserError(f"tokenizer/dataset vocabulary mismatch: {tok_dir} has {len(tok)} tokens but the dataset "
                        f"{cfg.dataset} was packed with vocab_size={d_vocab}; use the dataset's tokenizer")
    shape = cfg.model.resolved()
    vocab = cfg.model.vocab_size or len(tok)
    if vocab < len(tok):
        raise UserError(f"model.vocab_size ({vocab}) is smaller than the tokenizer ({len(tok)} tokens from {tok_dir})")
    from dataclasses import replace

    shape = replace(shape, vocab_size=vocab)
    seq_len = info["seq_len"]
    if seq_len > shape.max_position_embeddings:
        raise UserError(f"dataset seq_len {seq_len} exceeds the model context "
                        f"(model.max_position_embeddings={shape.max_position_embeddings}); raise it or repack shorter")
    g = cfg.deepspeed.global_batch(cfg.scaling.num_workers)
    if info["rows"] < cfg.deepspeed.micro_batch_size * cfg.scaling.num_workers:
        raise UserError(f"dataset {cfg.dataset} has {info['rows']} sequences, fewer than one micro-batch round "
                        f"(micro_batch_size x num_workers = "
                        f"{cfg.deepspeed.micro_batch_size * cfg.scaling.num_workers})")
    expect = {"model_shape": to_dict(shape)}
    check_resume(cfg, expect)
    check_memory(cfg, shape, seq_len)
    return info, tok_dir, shape, expect, g


def run(cfg: PretrainConfig) -> dict:
    from llmray.cluster import init_ray
    from llmray.train.lm import CausalLMTask
    from llmray.train.trainer import finish, launch, loop_spec, ordered_parquet

    info, tok_dir, shape, expect, g = prepare(cfg)
    init_ray(cfg.ray)
    ds = ordered_parquet([str(Path(f).resolve()) for f in info["files"]], info["columns"])
    task = CausalLMTask(tokenizer_dir=str(tok_dir), model=cfg.model, seed=cfg.seed)
    spec = loop_spec(cfg, task, shape, info["rows"], expect)
    print(f"[llmray] pretrain: {info['rows']} sequences x {info['seq_len']} tokens, "
          f"{shape.num_params() / 1e6:.2f}M params, global batch {g}, {cfg.max_steps} steps "
          f"on {cfg.scaling.num_workers} workers (ZeRO-{cfg.deepspeed.zero_stage})",
          flush=True)
    result = launch(cfg, spec, ds, "pretrain", ingest_cpus=1.0)  # the parquet read tasks
    return finish(cfg, "pretrain", to_dict(cfg), result, [cfg.dataset, str(tok_dir)],
                  {"num_params": shape.num_params(), "seq_len": info["seq_len"]})
