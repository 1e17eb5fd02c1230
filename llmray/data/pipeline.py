"""The clean-dedup steps run per file by Ray tasks: `sign_file` (read, clean, hash, stage as Parquet)
and `write_survivors` (drop the removed ids); the recipe is `llmray.stages.clean_dedup`."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from pathlib import Path

from llmray.config import to_dict
from llmray.data.config import CleanConfig, CleanDedupConfig

log = logging.getLogger(__name__)

STEP_ORDER = ("read", "normalize", "html", "length", "gopher_quality", "c4", "gopher_repetition", "fineweb", "pii")


def build_steps(cfg: CleanConfig) -> list:
    """Cleaning steps, cheap first: normalisers, length, then the heavier quality filters."""
    from llmray.data import filters as f

    if not cfg.enabled:
        return []
    kw = lambda section: {k: v for k, v in to_dict(section).items() if k != "enabled"}  # noqa: E731
    steps: list = []
    if cfg.normalize:
        steps.append(f.Normalize())
    if cfg.html:
        steps.append(f.HtmlStrip())
    steps.append(f.LengthFilter(cfg.min_chars, cfg.max_chars))
    if cfg.gopher_quality.enabled:
        steps.append(f.GopherQualityFilter(**kw(cfg.gopher_quality)))
    if cfg.c4.enabled:
        steps.append(f.C4Filter(**kw(cfg.c4)))
    if cfg.gopher_repetition.enabled:
        steps.append(f.GopherRepetitionFilter(**kw(cfg.gopher_repetition)))
    if cfg.fineweb.enabled:
        steps.append(f.FineWebFilter(**kw(cfg.fineweb)))
    if cfg.pii:
        steps.append(f.PiiRedact())
    return steps


def staged_schema(cfg: CleanDedupConfig, bands: int):
    import pyarrow as pa

    fields = [("id", pa.string()), ("text", pa.string())] + [(c, pa.string()) for c in cfg.read.keep_columns]
    fields += [("_exact", pa.uint64()), ("_bands", pa.list_(pa.uint64(), bands))]
    if cfg.dedup.minhash and cfg.dedup.verify:
        fields.append(("_sig", pa.list_(pa.uint32(), cfg.dedup.num_perm)))
    return pa.schema(fields)


def sign_file(idx: int, uri: str, cfg: CleanDedupConfig, stage_dir: str) -> dict:
    """Phase 1 for one input file: read in chunks, clean, hash, sign; stage as Parquet.
    Writes `part-i.parquet` then `part-i.json` (the stats, and the part's completion marker)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmray.data.dedup import minhash as mh
    from llmray.data.filters import run_steps
    from llmray.data.readers import ReadErrors, read_chunks

    steps = build_steps(cfg.clean)
    bands, rows = cfg.dedup.band_shape()
    a, b = mh.permutations(cfg.dedup.num_perm, cfg.dedup.seed)
    schema = staged_schema(cfg, bands)
    errors = ReadErrors()
    counts: Counter = Counter()
    secs: Counter = Counter()
    out = Path(stage_dir) / f"part-{idx:05d}.parquet"
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    # Staged parts are scratch read twice by this job: no compression, and no dictionary for the
    # unique ids, the text and the hashes (both only cost time here; measured in docs/data.md).
    writer = pq.ParquetWriter(tmp, schema, compression="none", use_dictionary=list(cfg.read.keep_columns))
    try:
        t = time.perf_counter()
        for batch in read_chunks(uri, cfg.read.text_column, cfg.read.id_column, tuple(cfg.read.keep_columns),
                                 cfg.read.chunk_rows, errors):
            n = len(batch["id"])
            counts["read/out"] += n
            secs["read"] += time.perf_counter() - t
            t = time.perf_counter()
            batch, c = run_steps(steps, batch)
            counts.update(c)
            secs["clean"] += time.perf_counter() - t
            t = time.perf_counter()
            texts = batch["text"]
            toks = [mh.words(x) for x in texts]  # one lower/split pass for the exact hash and the shingles
            exact = np.fromiter(map(mh.exact_hash_of_words, toks), dtype=np.uint64, count=len(texts))
            sig = None
            if cfg.dedup.minhash:
                sh, starts = mh.shingle_hashes(texts, cfg.dedup.ngram, cfg.dedup.shingle, toks)
                sig = mh.signatures(sh, starts, a, b)
                keys = mh.band_keys(sig, bands, rows)
            else:
                keys = np.zeros((len(texts), bands), dtype=np.uint64)
            secs["minhash"] += time.perf_counter() - t
            t = time.perf_counter()
            cols = {k: batch[k] for k in ["id", "text", *cfg.read.keep_columns]}
            cols["_exact"] = exact
            cols["_bands"] = pa.FixedSizeListArray.from_arrays(pa.array(keys.reshape(-1), pa.uint64()), bands)
            if "_sig" in schema.names:
                cols["_sig"] = pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1), pa.uint32()), sig.shape[1])
            writer.write_table(pa.table(cols, schema=schema))
            counts["clean/out"] += len(texts)
            secs["write"] += time.perf_counter() - t
            t = time.perf_counter()
        secs["read"] += time.perf_counter() - t
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, out)
    import resource

    stats = {"idx": idx, "file": uri, "counts": dict(counts), "seconds": {k: round(v, 4) for k, v in secs.items()},
             "errors": errors.items, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    marker = out.with_suffix(".json")
    mtmp = marker.with_name(f".{marker.name}.{uuid.uuid4().hex[:8]}")
    mtmp.write_text(json.dumps(stats))
    os.replace(mtmp, marker)
    return stats


def write_survivors(idx: int, staged: str, removed_dir: str, out_dir: str, columns: list[str]) -> dict:
    """Phase 3 for one staged part: keep rows whose id was not removed, in order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = time.perf_counter()
    removed = [pq.read_table(p, columns=["id"]).column("id") for p in sorted(Path(removed_dir).glob("part-*.parquet"))]
    table = pq.read_table(staged, columns=columns)
    n_in = table.num_rows
    for ids in removed:
        if len(ids):
            table = table.filter(pc.invert(pc.is_in(table["id"], value_set=ids.combine_chunks())))
    pq.write_table(table, Path(out_dir) / f"part-{idx:05d}.parquet")
    return {"idx": idx, "rows_in": n_in, "rows_out": table.num_rows, "seconds": time.perf_counter() - t}
