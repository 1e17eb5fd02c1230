"""Multi-source mixing for `pack`: token budgets per source and phase, a seeded document order, and
packed shards whose manifest counts tokens per source (Ray tasks tokenize and write; the driver plans
from document lengths only).

A phase (e.g. the main mix, then a final anneal on a high-quality source) has a token budget and
weights. Each source's quota is its weight's share of the budget (largest remainder, so quotas sum
to the budget). A source fills its quota with documents in a seeded random order, cycling with a
fresh order (an epoch) when it runs out, and its last document is cut to the exact quota. Within a
phase the documents of all sources are interleaved by their position in their own source's quota,
so every stretch of the phase holds about the phase's weights. Phases follow each other in order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from llmray.config import check


@dataclass(frozen=True)
class MixSource:
    name: str = ""
    input: str = ""
    """A clean-dedup dataset artifact (its `docs/` is read), or any JSONL/Parquet path, glob or URI."""


@dataclass(frozen=True)
class MixPhase:
    weights: dict[str, float] = field(default_factory=dict)
    """Source name -> weight (normalised to sum 1) in this phase."""
    tokens: int | None = None
    """Token budget of the phase; null (first phase only): as many as the sources hold without repeating."""


@dataclass(frozen=True)
class MixConfig:
    sources: list[MixSource] = field(default_factory=list)
    phases: list[MixPhase] = field(default_factory=list)
    seed: int = 0
    """Same seed, same sources, same config: byte-identical shards."""
    sequences_per_shard: int = 1024

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        check(len(names) >= 1 and all(names), "pack.mix.sources", "needs at least one source, each with a name")
        check(len(set(names)) == len(names), "pack.mix.sources", f"names must be unique, got {names}")
        check(all(s.input for s in self.sources), "pack.mix.sources", "every source needs an input")
        check(len(self.phases) >= 1, "pack.mix.phases", "needs at least one phase")
        for i, ph in enumerate(self.phases):
            key = f"pack.mix.phases[{i}]"
            unknown = set(ph.weights) - set(names)
            check(not unknown, f"{key}.weights", f"names unknown sources {sorted(unknown)}")
            check(bool(ph.weights) and all(w >= 0 for w in ph.weights.values()) and sum(ph.weights.values()) > 0,
                  f"{key}.weights", "must hold non-negative weights with a positive sum")
            check(ph.tokens is None or ph.tokens >= 1, f"{key}.tokens", "must be >= 1 or null")
            check(ph.tokens is not None or i == 0, f"{key}.tokens", "only the first phase may leave tokens null")
        check(self.sequences_per_shard >= 1, "pack.mix.sequences_per_shard", "must be >= 1")


def quotas(budget: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer tokens per source summing exactly to `budget` (largest remainder, ties by name)."""
    total = sum(weights.values())
    exact = {k: budget * w / total for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    left = budget - sum(out.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - out[k]), k))[:left]:
        out[k] += 1
    return out


def default_budget(available: dict[str, int], weights: dict[str, float]) -> int:
    """The largest budget no source must repeat for: min over sources of tokens / weight share."""
    total = sum(weights.values())
    return int(min(available[k] * total / w for k, w in weights.items() if w > 0))


def _rng(seed: int, *parts) -> np.random.Generator:
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def fill(lengths: np.ndarray, quota: int, seed: int, source: str, cursor: dict) -> list[tuple[int, int]]:
    """(document index, tokens taken) pieces of one source adding up to exactly `quota`. `cursor`
    carries the source's epoch and position across phases, so a later phase continues the order."""
    pieces, got = [], 0
    if quota and lengths.sum() == 0:
        raise ValueError(f"source {source!r} holds no tokens")
    while got < quota:
        if "order" not in cursor or cursor["pos"] >= len(cursor["order"]):
            cursor["epoch"] = cursor.get("epoch", -1) + 1
            cursor["order"], cursor["pos"] = _rng(seed, source, cursor["epoch"]).permutation(len(lengths)), 0
        d = int(cursor["order"][cursor["pos"]])
        cursor["pos"] += 1
        take = min(int(lengths[d]), quota - got)
        if take:
            pieces.append((d, take))
            got += take
    return pieces


def interleave(pieces: dict[str, list[tuple[int, int]]]) -> list[tuple[str, int, int]]:
    """(source, doc, tokens) in order of each piece's midpoint as a fraction of its source's quota."""
    keyed = []
    for rank, (name, ps) in enumerate(sorted(pieces.items())):
        total = sum(t for _, t in ps) or 1
        done = 0
        for d, t in ps:
            keyed.append(((done + t / 2) / total, rank, name, d, t))
            done += t
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [(name, d, t) for _, _, name, d, t in keyed]


def plan(cfg: MixConfig, lengths: dict[str, np.ndarray]) -> list[list[tuple[str, int, int]]]:
    """The mixed document order, per phase."""
    cursors: dict[str, dict] = {k: {} for k in lengths}
    out = []
    for ph in cfg.phases:
        budget = ph.tokens if ph.tokens is not None else default_budget(
            {k: int(v.sum()) for k, v in lengths.items()}, ph.weights)
        q = quotas(budget, ph.weights)
        out.append(interleave({k: fill(lengths[k], n, cfg.seed, k, cursors[k]) for k, n in q.items() if n}))
    return out


def _tokenize_file(uri: str, tokenizer: str, eos_token: str, text_column: str, batch: int):
    """(tokens per document, token ids (with EOS) of every document as an arrow list<int32> array, bad
    records) of one file. The driver fetches only the lengths; the ids stay in the object store."""
    import pyarrow as pa

    from llmray.data.pack import _fast_tokenizer
    from llmray.data.readers import ReadErrors, read_chunks

    tok, eos = _fast_tokenizer(tokenizer, eos_token)
    errors = ReadErrors()
    docs = []
    for chunk in read_chunks(uri, text_column, "id", (), batch, errors):
        docs += [[*e.ids, eos] for e in tok.encode_batch(chunk["text"], add_special_tokens=False)]
    arr = pa.array(docs, pa.list_(pa.int32()))
    return np.diff(arr.offsets.to_numpy()).astype(np.int64), arr, errors.items


def layout(order: list[list[tuple[str, int, int]]], names: list[str], first_doc: dict[str, np.ndarray]) -> dict:
    """The planned stream as arrays, one entry per piece: source index, file index, document index in
    its file, tokens taken, phase, and the piece's start in the stream. `first_doc[name]`: index of
    each file's first document in its source (len = files + 1)."""
    rows = [(names.index(n), d, t, p) for p, ph in enumerate(order) for n, d, t in ph]
    src, doc, take, phase = (np.array(c, np.int64) for c in zip(*rows)) if rows else [np.zeros(0, np.int64)] * 4
    file = np.zeros(len(src), np.int64)
    for i, n in enumerate(names):
        sel = src == i
        file[sel] = np.searchsorted(first_doc[n], doc[sel], side="right") - 1
        doc[sel] -= first_doc[n][file[sel]]
    start = np.concatenate([[0], np.cumsum(take)[:-1]]) if len(take) else take
    return {"src": src, "file": file, "doc": doc, "take": take, "phase": phase, "start": start}


def shard_pieces(lay: dict, lo: int, hi: int) -> np.ndarray:
    """(k, 5) int64 rows (source, file, document, first token, tokens) of the stream's tokens [lo, hi)."""
    end = lay["start"] + lay["take"]
    i0, i1 = int(np.searchsorted(end, lo, side="right")), int(np.searchsorted(lay["start"], hi, side="left"))
    a = np.maximum(lay["start"][i0:i1], lo)
    b = np.minimum(end[i0:i1], hi)
    first = a - lay["start"][i0:i1]
    return np.stack([lay["src"][i0:i1], lay["file"][i0:i1], lay["doc"][i0:i1], first, b - a], axis=1)


def _write_shard(path: str, pieces: np.ndarray, keys: list[tuple[int, int]], seq_len: int, eos: int | None,
                 *files) -> str:
    """One output shard: the pieces' tokens cut into rows of `seq_len` (`files[i]` is the token array
    of file `keys[i]`); `eos` set: a `position_ids` column too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmray.data.pack import _list_column, position_ids

    arrays = dict(zip(keys, files))
    flat = np.concatenate([np.zeros(0, np.int32)] + [
        arrays[(int(s), int(f))][int(d)].values.to_numpy()[a : a + n] for s, f, d, a, n in pieces])
    rows = flat.reshape(-1, seq_len)
    cols = {"input_ids": _list_column(rows)}
    if eos is not None:
        cols["position_ids"] = _list_column(position_ids(rows, eos))
    pq.write_table(pa.table(cols), path)
    return path


def mix_and_pack(cfg, files: dict[str, list[str]], shards_dir, eos_token: str) -> dict:
    """Tokenize every source file (a Ray task each), plan the mix from document lengths alone, and
    write each `shards/part-i.parquet` of `cfg.seq_len` rows in a Ray task of its own, fed the token
    arrays of the files it draws from: the driver never holds the corpus. Returns the manifest metrics
    (tokens per source and phase)."""
    import ray

    from llmray.data.pack import _fast_tokenizer

    mix: MixConfig = cfg.mix
    names = sorted(files)
    task = ray.remote(_tokenize_file).options(num_cpus=cfg.num_cpus_per_task, num_returns=3)
    refs = {k: [task.remote(f, cfg.tokenizer, eos_token, cfg.text_column, cfg.tokenize_batch) for f in files[k]]
            for k in names}
    per_file = {k: ray.get([r[0] for r in refs[k]]) for k in names}
    errors = [e for k in names for errs in ray.get([r[2] for r in refs[k]]) for e in errs]
    lengths = {k: np.concatenate([np.zeros(0, np.int64), *per_file[k]]) for k in names}
    first_doc = {k: np.concatenate([[0], np.cumsum([len(x) for x in per_file[k]])]).astype(np.int64) for k in names}
    lay = layout(plan(mix, lengths), names, first_doc)
    total = int(lay["take"].sum())
    n_rows = total // cfg.seq_len
    used = n_rows * cfg.seq_len
    eos = _fast_tokenizer(cfg.tokenizer, eos_token)[1] if cfg.reset_position_ids else None
    write = ray.remote(_write_shard).options(num_cpus=cfg.num_cpus_per_task)
    per_shard = mix.sequences_per_shard * cfg.seq_len
    jobs = []
    for i, lo in enumerate(range(0, used, per_shard)):
        pieces = shard_pieces(lay, lo, min(lo + per_shard, used))
        keys = sorted({(int(s), int(f)) for s, f in pieces[:, :2]})
        jobs.append(write.remote(str(shards_dir / f"part-{i:05d}.parquet"), pieces, keys, cfg.seq_len, eos,
                                 *[refs[names[s]][f][1] for s, f in keys]))
    ray.get(jobs)
    kept = np.clip(used - lay["start"], 0, lay["take"])  # tokens of each piece inside the full rows
    by_phase = [{k: int(kept[(lay["phase"] == p) & (lay["src"] == i)].sum()) for i, k in enumerate(names)}
                for p in range(len(mix.phases))]
    by_source = {k: sum(ph[k] for ph in by_phase) for k in names}
    return {
        "tokens_by_source": by_source,
        "share_by_source": {k: round(v / max(1, used), 6) for k, v in by_source.items()},
        "tokens_by_phase_source": by_phase,
        "documents": int(sum(len(v) for v in lengths.values())),
        "num_sequences": n_rows, "dropped_tokens": total - used,
        "shards": [f"shards/part-{i:05d}.parquet" for i in range(len(jobs))], "errors": errors,
    }
