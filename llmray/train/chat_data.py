"""Chat and preference data for the trainers: JSONL reading with file:line errors, chat rendering with
assistant-only labels, packing several conversations per row, fixed-length row tables.

Pure functions (no Ray): `encode_chat`, `pack`, `pad_rows`; `read_records` validates every line
before any training work starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from llmray.errors import UserError

IGNORE = -100


def jsonl_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"data not found: {p}")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*.jsonl") if not f.name.startswith("."))
    if not files:
        raise UserError(f"no .jsonl files under {p}")
    return files


def read_records(path: str | Path, validate: Callable[[dict], str | None], limit: int | None = None) -> list[dict]:
    """Every record of the JSONL file(s) at `path`; the first invalid one raises UserError naming file:line."""
    out: list[dict] = []
    for f in jsonl_files(path):
        with f.open() as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{f}:{i}: not valid JSON ({e})") from None
                if not isinstance(rec, dict):
                    raise UserError(f"{f}:{i}: expected a JSON object, got {type(rec).__name__}")
                problem = validate(rec)
                if problem:
                    raise UserError(f"{f}:{i}: {problem}")
                out.append(rec)
                if limit is not None and len(out) >= limit:
                    return out
    if not out:
        raise UserError(f"{path}: no records")
    return out


def check_messages(messages: Any, field: str = "messages", need_assistant: bool = True) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"field {field!r} must be a non-empty list of {{role, content}} messages"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"{field}[{j}] must be an object with string 'role' and 'content'"
        if m["role"] not in ("system", "user", "assistant"):
            return f"{field}[{j}].role {m['role']!r} is not system, user or assistant"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return f"{field!r} has no assistant turn (nothing to learn)"
    return None


def validate_chat(rec: dict) -> str | None:
    if "messages" not in rec:
        return "missing field 'messages'"
    return check_messages(rec["messages"])


def encode_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the chat template's rendering; labels are the ids on assistant tokens
    (content and its closing EOS, from the template's {% generation %} mask) and -100 elsewhere."""
    o = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(o["input_ids"])
    mask = list(o["assistant_masks"])
    return ids, [t if k else IGNORE for t, k in zip(ids, mask)]


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Greedy in-order packing of (ids, labels) examples into rows of exactly seq_len tokens.

    Each example's position_ids restart at 0 (transformers turns the restarts into a block-diagonal
    causal mask: no attention across examples). The tail padding is its own block with labels -100.
    Examples longer than seq_len must be filtered out before.
    """
    rows: list[dict[str, list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []

    def flush() -> None:
        pad = seq_len - len(ids)
        rows.append({"input_ids": ids + [pad_id] * pad, "labels": labels + [IGNORE] * pad,
                     "position_ids": pos + list(range(pad))})

    for e_ids, e_labels in examples:
        if len(e_ids) > seq_len:
            raise ValueError(f"example of {len(e_ids)} tokens exceeds seq_len {seq_len}")
        if len(ids) + len(e_ids) > seq_len:
            flush()
            ids, labels, pos = [], [], []
        ids += e_ids
        labels += e_labels
        pos += list(range(len(e_ids)))
    if ids:
        flush()
    return rows


def pad_rows(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> list[dict[str, list[int]]]:
    """One example per row, right-padded (no packing)."""
    return [
        {"input_ids": i + [pad_id] * (seq_len - len(i)), "labels": lab + [IGNORE] * (seq_len - len(lab)),
         "position_ids": list(range(seq_len))}
        for i, lab in examples
    ]


def general_rows(files: list[Path], seq_len: int, n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """`n` rows of plain text for the LM loss on every token: the packed pretraining shards' sequences
    cut into seq_len pieces, taken in a seeded order (cycling when `n` exceeds what they hold)."""
    import numpy as np
    import pyarrow.parquet as pq

    if n <= 0:
        return []
    pieces: list[list[int]] = []
    for f in files:
        for seq in pq.read_table(f, columns=["input_ids"]).column("input_ids").to_pylist():
            pieces += [seq[i : i + seq_len] for i in range(0, len(seq) - seq_len + 1, seq_len)]
    if not pieces:
        raise UserError(f"no sequence of {seq_len} tokens in {files[0].parent if files else 'the mix data'}")
    order = np.random.default_rng(seed).permutation(len(pieces))
    picked = [pieces[int(order[i % len(order)])] for i in range(n)]
    return [{"input_ids": ids, "labels": list(ids), "position_ids": list(range(seq_len)), "general": 1}
            for ids in picked]


def mix_rows(chat: list[dict], general: list[dict]) -> list[dict]:
    """Chat and general rows interleaved evenly (the `pack.mix` interleaving), so every stretch of
    batches holds about the configured ratio; chat rows get `general` = 0."""
    from llmray.data.mix import interleave

    chat = [{**r, "general": 0} for r in chat]
    order = interleave({"chat": [(i, 1) for i in range(len(chat))], "general": [(i, 1) for i in range(len(general))]})
    return [chat[i] if name == "chat" else general[i] for name, i, _ in order]


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    """Rows of equal-length int lists (and floats) as one parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, Any] = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        cols[k] = pa.array(vals, type=pa.list_(pa.int32())) if isinstance(vals[0], list) else pa.array(vals)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows -> dict of numpy arrays (the eval rows handed to the workers)."""
    import numpy as np

    return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def validate_preference(rec: dict) -> str | None:
    """{"prompt": [messages], "chosen": str, "rejected": str}; identical answers teach nothing."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in rec:
            return f"missing field {key!r} (preference records need prompt, chosen and rejected)"
    problem = check_messages(rec["prompt"], "prompt", need_assistant=False)
    if problem:
        return problem
    for key in ("chosen", "rejected"):
        if not isinstance(rec[key], str) or not rec[key].strip():
            return f"field {key!r} must be a non-empty string"
    if rec["chosen"].strip() == rec["rejected"].strip():
        return "chosen and rejected are identical (the pair carries no preference)"
    return None


def encode_pair(tok, rec: dict) -> dict[str, list[int]]:
    """chosen/rejected input ids and assistant-only labels of prompt + answer."""
    c_ids, c_lab = encode_chat(tok, rec["prompt"] + [{"role": "assistant", "content": rec["chosen"]}])
    r_ids, r_lab = encode_chat(tok, rec["prompt"] + [{"role": "assistant", "content": rec["rejected"]}])
    return {"chosen_ids": c_ids, "chosen_labels": c_lab, "rejected_ids": r_ids, "rejected_labels": r_lab}


def pad_pairs(pairs: list[dict[str, list[int]]], seq_len: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Right-pad every pair's sequences to seq_len (ids with pad, labels with -100)."""
    out = []
    for p in pairs:
        row = {}
        for k, v in p.items():
            fill = IGNORE if k.endswith("labels") else pad_id
            row[k] = v + [fill] * (seq_len - len(v))
        out.append(row)
    return out


def preference_rows(path: str | Path, tok, seq_len: int, eval_fraction: float, limit: int | None = None):
    """(train rows, eval rows, stats) of padded pairs; pairs longer than seq_len are dropped and counted."""
    recs = read_records(path, validate_preference, limit)
    pairs, dropped = [], 0
    for r in recs:
        p = encode_pair(tok, r)
        if max(len(p["chosen_ids"]), len(p["rejected_ids"])) > seq_len:
            dropped += 1
            continue
        pairs.append(p)
    if not pairs:
        raise UserError(f"every pair in {path} is longer than seq_len={seq_len}; raise seq_len")
    n_eval = int(len(pairs) * eval_fraction)
    train, held = pairs[: len(pairs) - n_eval], pairs[len(pairs) - n_eval:]
    stats = {"pairs": len(recs), "dropped_too_long": dropped, "train_pairs": len(train), "eval_pairs": len(held)}
    return pad_pairs(train, seq_len, tok.pad_token_id), pad_pairs(held, seq_len, tok.pad_token_id), stats
