"""Stage `pack`: tokenize clean documents and pack them into fixed-length shards for pretraining.

Local:   llmray pack --config jobs/configs/pack/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/pack.py --config jobs/configs/pack/default.yaml
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from llmray import artifacts
from llmray.config import to_dict
from llmray.data.pack import PackConfig, pack_file
from llmray.errors import UserError
from llmray.models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

Config = PackConfig


def _input_files(path: str) -> list[str]:
    from llmray.data.readers import resolve_files

    p = Path(path)
    if (p / "docs").is_dir():
        return resolve_files(str(p / "docs"))
    return resolve_files(path)


def _run_mix(cfg: PackConfig, tok) -> dict:
    """`pack` with a `mix` section: several sources, weights and phases, tokens counted per source."""
    from llmray.cluster import init_ray
    from llmray.data.mix import mix_and_pack

    files = {s.name: _input_files(s.input) for s in cfg.mix.sources}
    init_ray(cfg.ray)
    t0 = time.monotonic()
    with artifacts.publish(cfg.output) as tmp:
        (tmp / "shards").mkdir()
        m = mix_and_pack(cfg, files, tmp / "shards", tok.eos_token)
        errors = m.pop("errors")
        if len(errors) > cfg.max_errors:
            raise UserError(f"{len(errors)} bad input records exceed max_errors={cfg.max_errors}; nothing was "
                            f"published. First: {errors[0]['file']} {errors[0]['where']}: {errors[0]['error']}")
        if m["num_sequences"] == 0:
            raise UserError(f"the mix yields no full sequence of seq_len={cfg.seq_len} tokens; raise the phase "
                            "budgets or lower seq_len")
        metrics = {"seq_len": cfg.seq_len, "num_tokens": m["num_sequences"] * cfg.seq_len,
                   "vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "position_ids": cfg.reset_position_ids,
                   "errors": len(errors), "seconds": round(time.monotonic() - t0, 3), **m}
        inputs = [p for p in [cfg.tokenizer, *(s.input for s in cfg.mix.sources)] if artifacts.is_complete(p)]
        artifacts.write_manifest(tmp, "dataset", "llmray.stages.pack", to_dict(cfg), metrics, inputs)
    log.info("pack: mixed %d sequences x %d tokens; shares %s", m["num_sequences"], cfg.seq_len,
             m["share_by_source"])
    return {"output": cfg.output, **{k: v for k, v in metrics.items() if k != "shards"}}


def run(cfg: PackConfig) -> dict:
    """Stage `pack`: publish a packed `dataset` artifact (`shards/part-*.parquet` + manifest)."""
    import ray

    from llmray.cluster import init_ray

    if artifacts.is_complete(cfg.output, "dataset") and not cfg.force:
        log.info("pack: %s is complete; skipping (force=true to rebuild)", cfg.output)
        return {"skipped": True, "output": cfg.output}
    if not Path(cfg.tokenizer).is_dir():
        raise UserError(f"tokenizer not found: {cfg.tokenizer}")
    try:
        tok = load_tokenizer(cfg.tokenizer)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad dir
        raise UserError(f"tokenizer {cfg.tokenizer} is unreadable: {e}") from None
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {cfg.tokenizer} has no EOS token")
    if not (Path(cfg.tokenizer) / "tokenizer.json").is_file():
        raise UserError(f"tokenizer {cfg.tokenizer} has no tokenizer.json (a fast tokenizer is needed)")
    eos_token = tok.eos_token
    if cfg.mix is not None:
        return _run_mix(cfg, tok)
    files = _input_files(cfg.input)
    init_ray(cfg.ray)
    t0 = time.monotonic()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    with artifacts.publish(cfg.output) as tmp:
        shards = tmp / "shards"
        shards.mkdir()
        items = [{"idx": i, "uri": f} for i, f in enumerate(files)]
        res = (ray.data.from_items(items, override_num_blocks=len(items))
               .map(lambda r: pack_file(r["idx"], r["uri"], cfg, str(shards), eos_token),
                    num_cpus=cfg.num_cpus_per_task)
               .take_all())
        res.sort(key=lambda r: r["idx"])
        errors = [e for r in res for e in json.loads(r["errors"])]
        if len(errors) > cfg.max_errors:
            raise UserError(f"{len(errors)} bad input records exceed max_errors={cfg.max_errors}; nothing was "
                            f"published. First: {errors[0]['file']} {errors[0]['where']}: {errors[0]['error']}")
        n_seq = sum(r["sequences"] for r in res)
        if n_seq == 0:
            raise UserError(f"input {cfg.input} yields no full sequence of seq_len={cfg.seq_len} tokens "
                            f"({sum(r['tokens_in'] for r in res)} tokens in); lower seq_len or add data")
        elapsed = time.monotonic() - t0
        metrics = {
            "seq_len": cfg.seq_len,
            "num_sequences": n_seq,
            "num_tokens": n_seq * cfg.seq_len,
            "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id,
            "documents": sum(r["documents"] for r in res),
            "dropped_tokens": sum(r["dropped_tokens"] for r in res),
            "position_ids": cfg.reset_position_ids,
            "shards": [f"shards/part-{r['idx']:05d}.parquet" for r in res],
            "errors": len(errors),
            "tokens_per_s": round(sum(r["tokens_in"] for r in res) / max(elapsed, 1e-9), 1),
        }
        inputs = [cfg.tokenizer] if artifacts.is_complete(cfg.tokenizer) else []
        if artifacts.is_complete(cfg.input):
            inputs.append(cfg.input)
        artifacts.write_manifest(tmp, "dataset", "llmray.stages.pack", to_dict(cfg), metrics, inputs)
    log.info("pack: %d sequences x %d tokens from %d documents", n_seq, cfg.seq_len, metrics["documents"])
    return {"output": cfg.output, **{k: v for k, v in metrics.items() if k != "shards"}}
