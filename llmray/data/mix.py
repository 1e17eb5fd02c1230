"""Multi-source mixing for `pack`: token budgets per source and phase, a seeded document order, and
packed shards whose manifest counts tokens per source.

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
    """Token ids (with EOS) of every document of one file, as an arrow list<int32> array; bad records."""
    import pyarrow as pa

    from llmray.data.pack import _fast_tokenizer
    from llmray.data.readers import ReadErrors, read_chunks

    tok, eos = _fast_tokenizer(tokenizer, eos_token)
    errors = ReadErrors()
    docs = []
    for chunk in read_chunks(uri, text_column, "id", (), batch, errors):
        docs += [[*e.ids, eos] for e in tok.encode_batch(chunk["text"], add_special_tokens=False)]
    return pa.array(docs, pa.list_(pa.int32())), errors.items


def mix_and_pack(cfg, files: dict[str, list[str]], shards_dir, eos_token: str) -> dict:
    """Tokenize every source file (Ray tasks), plan the mix, write `shards/part-i.parquet` rows of
    `cfg.seq_len`; return the manifest metrics (tokens per source and phase)."""
    import pyarrow as pa
    import ray

    mix: MixConfig = cfg.mix
    task = ray.remote(_tokenize_file).options(num_cpus=cfg.num_cpus_per_task)
    refs = {k: [task.remote(f, cfg.tokenizer, eos_token, cfg.text_column, cfg.tokenize_batch) for f in fs]
            for k, fs in files.items()}
    docs, errors = {}, []
    for k, rs in refs.items():
        got = ray.get(rs)
        docs[k] = pa.concat_arrays([g[0] for g in got]) if got else pa.array([], pa.list_(pa.int32()))
        errors += [e for g in got for e in g[1]]
    lengths = {k: np.diff(v.offsets.to_numpy()) for k, v in docs.items()}
    names = sorted(docs)
    stream, origin, phase_of = [], [], []
    for p, order in enumerate(plan(mix, lengths)):
        for name, d, t in order:
            stream.append(docs[name][d].values.to_numpy()[:t])
            origin.append(np.full(t, names.index(name), np.int8))
            phase_of.append(np.full(t, p, np.int8))
    flat = np.concatenate(stream) if stream else np.zeros(0, np.int32)
    n_rows = len(flat) // cfg.seq_len
    used = n_rows * cfg.seq_len
    src = np.concatenate(origin)[:used] if origin else np.zeros(0, np.int8)
    phs = np.concatenate(phase_of)[:used] if phase_of else np.zeros(0, np.int8)
    shards = _write_shards(flat[:used].reshape(n_rows, cfg.seq_len), cfg, mix.sequences_per_shard, shards_dir,
                           eos_token)
    by_source = {k: int((src == i).sum()) for i, k in enumerate(names)}
    return {
        "tokens_by_source": by_source,
        "share_by_source": {k: round(v / max(1, used), 6) for k, v in by_source.items()},
        "tokens_by_phase_source": [{k: int(((phs == p) & (src == i)).sum()) for i, k in enumerate(names)}
                                   for p in range(len(mix.phases))],
        "documents": int(sum(len(v) for v in docs.values())),
        "num_sequences": n_rows, "dropped_tokens": int(len(flat) - used), "shards": shards, "errors": errors,
    }


def _write_shards(rows: np.ndarray, cfg, per_shard: int, shards_dir, eos_token: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmray.data.pack import _fast_tokenizer, _list_column, position_ids

    eos = _fast_tokenizer(cfg.tokenizer, eos_token)[1]
    out = []
    for i, s in enumerate(range(0, len(rows), per_shard)):
        part = rows[s : s + per_shard]
        cols = {"input_ids": _list_column(part)}
        if cfg.reset_position_ids:
            cols["position_ids"] = _list_column(position_ids(part, eos))
        pq.write_table(pa.table(cols), shards_dir / f"part-{i:05d}.parquet")
        out.append(f"shards/part-{i:05d}.parquet")
    return out
