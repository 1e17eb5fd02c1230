"""A labelled near-duplicate set built from real English text, and its scoring by edit rate.

Sources (Debian packages; install with `apt-get install -y fortunes fortunes-min debian-reference-en`):
short documents are fortune-database entries of 20-100 words (/usr/share/games/fortunes), long
documents are the Debian Reference's plain text cut at paragraph ends into 1,000-2,000-word pieces.
Natural near duplicates are removed first: a document is dropped when its exact Jaccard on
character 5-gram shingles with an earlier kept one is >= 0.3 (candidates from an LSH at 0.2).
Then a quarter of the kept documents each get one planted copy, split evenly between an exact
copy (case and spacing changed) and variants with 5%, 10% and 20% of words edited (each edit a
substitution by a random corpus word, a deletion or an insertion, a third each).
Originals get ids `a-*`, copies `b-*`, so a keep-the-smallest-id dedup keeps originals.

    python bench/realtext.py --out /tmp/llmray-realtext        # build (docs/*.jsonl, labels.json)
    python bench/realtext.py --out /tmp/llmray-realtext --study # exact Jaccard by shingle scheme
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import random
import re
from pathlib import Path

FORTUNES = "/usr/share/games/fortunes"
REFERENCE = "/usr/share/debian-reference/debian-reference.en.txt.gz"
INSTALL = "apt-get install -y fortunes fortunes-min debian-reference-en"
RATES = (0.0, 0.05, 0.10, 0.20)


def short_documents() -> list[str]:
    files = [f for f in sorted(glob.glob(f"{FORTUNES}/*")) if "." not in os.path.basename(f)
             and not os.path.islink(f) and os.path.basename(f) not in ("art", "ascii-art")]
    docs = []
    for f in files:
        for e in Path(f).read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            e = e.strip().strip("%").strip()
            if 20 <= len(e.split()) <= 100:
                docs.append(e)
    return docs


def long_documents() -> list[str]:
    text = gzip.open(REFERENCE, "rt", encoding="utf-8", errors="replace").read()
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 5]
    docs, cur, n = [], [], 0
    for p in paras:
        cur.append(p)
        n += len(p.split())
        if n >= 1000:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
    return docs


def char_shingles(text: str, n: int = 5) -> set[str]:
    s = " ".join(text.lower().split())
    return {s[i : i + n] for i in range(max(1, len(s) - n + 1))}


def word_shingles(text: str, n: int) -> set[str]:
    w = text.lower().split()
    return {" ".join(w[i : i + n]) for i in range(max(1, len(w) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def drop_natural_duplicates(docs: list[str], threshold: float = 0.3) -> list[str]:
    from datasketch import MinHash, MinHashLSH

    sets = [char_shingles(d) for d in docs]
    lsh = MinHashLSH(threshold=0.2, num_perm=128)
    kept = []
    for i, (doc, s) in enumerate(zip(docs, sets)):
        m = MinHash(num_perm=128)
        m.update_batch([x.encode() for x in s])
        if any(jaccard(s, sets[j]) >= threshold for j in lsh.query(m)):
            continue
        lsh.insert(i, m)
        kept.append(doc)
    return kept


def edit(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    """Edit about `rate` of the words: substitute, delete or insert, a third each."""
    words = text.split()
    if rate == 0.0:
        return "  ".join(w.upper() if k % 7 == 0 else w for k, w in enumerate(words))
    k = max(1, round(rate * len(words)))
    for pos in sorted(rng.sample(range(len(words)), k), reverse=True):
        op = rng.randrange(3)
        if op == 0:
            words[pos] = rng.choice(vocab)
        elif op == 1:
            del words[pos]
        else:
            words.insert(pos + 1, rng.choice(vocab))
    return " ".join(words)


def build(out: Path, seed: int = 0, plant_frac: float = 0.25, files: int = 4) -> dict:
    """Write `out/docs/part-*.jsonl` and `out/labels.json`; return counts."""
    if not Path(REFERENCE).is_file() or not Path(FORTUNES).is_dir():
        raise SystemExit(f"real-text sources missing: run `{INSTALL}`")
    if (out / "labels.json").is_file():
        return json.loads((out / "labels.json").read_text())["counts"]
    rng = random.Random(seed)
    short, long_ = short_documents(), long_documents()
    base = drop_natural_duplicates(short + long_)
    rng.shuffle(base)
    vocab = sorted({w for d in base for w in d.split()})
    originals = [{"id": f"a-{i:06d}", "text": t} for i, t in enumerate(base)]
    copies, truth = [], {}
    for i, o in enumerate(rng.sample(originals, int(plant_frac * len(originals)))):
        rate = RATES[i % len(RATES)]
        cid = f"b-{i:06d}"
        copies.append({"id": cid, "text": edit(o["text"], rate, vocab, rng)})
        truth[cid] = {"original": o["id"], "rate": rate}
    rows = originals + copies
    (out / "docs").mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // files)
    for f in range(files):
        with open(out / "docs" / f"part-{f:05d}.jsonl", "w") as fh:
            for r in rows[f * per : (f + 1) * per]:
                fh.write(json.dumps(r) + "\n")
    n_words = sorted(len(r["text"].split()) for r in rows)
    counts = {"documents": len(rows), "originals": len(originals), "copies": len(copies),
              "short_sources": len(short), "long_sources": len(long_),
              "long_documents": sum(1 for w in n_words if w >= 1000),
              "median_words": n_words[len(n_words) // 2]}
    (out / "labels.json").write_text(json.dumps({"counts": counts, "copies": truth}))
    return counts


def score(removed: list[str], labels: dict) -> dict:
    """P/R/F1 over planted pairs. A pair is found when one of its two documents is removed (either
    may be kept); every other removal, including the second of a pair, is a false positive."""
    truth = labels["copies"]
    rem = set(removed)
    found_by_rate: dict[str, list[int]] = {}
    tp = 0
    for cid, t in truth.items():
        hit = int(cid in rem or t["original"] in rem)
        tp += hit
        found_by_rate.setdefault(f"{t['rate']:.2f}", []).append(hit)
    p = tp / len(rem) if rem else 1.0
    r = tp / len(truth)
    out = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r) if p + r else 0, 4),
           "removed": len(rem), "false_positives": len(rem) - tp}
    for rate, hits in sorted(found_by_rate.items()):
        out[f"recall@{rate}"] = round(sum(hits) / len(hits), 4)
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "docs").glob("*.jsonl")) for line in open(f)]


def study(out: Path) -> None:
    """Exact Jaccard of planted pairs (by rate, short vs long) and of each original's nearest
    unrelated neighbour among LSH candidates, for several shingle schemes."""
    import numpy as np

    rows = {r["id"]: r["text"] for r in _rows(out)}
    labels = json.loads((out / "labels.json").read_text())
    originals = [i for i in rows if i.startswith("a-")]
    rng = random.Random(1)
    sample = rng.sample(originals, min(3000, len(originals)))
    schemes = [("word", 1), ("word", 2), ("word", 3), ("word", 5), ("char", 4), ("char", 5), ("char", 6), ("char", 8)]
    print(f"{'scheme':<8} {'long':<5} " + " ".join(f"{'J@' + str(r):>13}" for r in RATES)
          + f" {'unrelated max':>14} {'p99.9':>6}")
    for kind, n in schemes:
        sh = (lambda t, n=n: char_shingles(t, n)) if kind == "char" else (lambda t, n=n: word_shingles(t, n))
        sets = {i: sh(rows[i]) for i in rows}
        for is_long in (False, True):
            cells = []
            for rate in RATES:
                js = [jaccard(sets[c], sets[t["original"]]) for c, t in labels["copies"].items()
                      if t["rate"] == rate and (len(rows[c].split()) >= 1000) == is_long]
                cells.append(f"{np.percentile(js, 10):.2f}/{np.median(js):.2f}" if js else "-")
            neigh = _nearest_unrelated(sets, [i for i in sample if (len(rows[i].split()) >= 1000) == is_long],
                                       originals)
            print(f"{kind}{n:<4} {str(is_long):<5} " + " ".join(f"{c:>13}" for c in cells)
                  + f" {max(neigh, default=0):>14.3f} {np.percentile(neigh, 99.9) if neigh else 0:>6.3f}")
    print("cells: 10th percentile / median exact Jaccard of planted pairs; unrelated: each sampled "
          "original's highest Jaccard with another original")


def _nearest_unrelated(sets: dict, sample: list[str], originals: list[str]) -> list[float]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=0.1, num_perm=64)
    mh = {}
    for i in originals:
        m = MinHash(num_perm=64)
        m.update_batch([x.encode() for x in sets[i]])
        mh[i] = m
        lsh.insert(i, m)
    return [max([jaccard(sets[i], sets[j]) for j in lsh.query(mh[i]) if j != i], default=0.0) for i in sample]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/llmray-realtext")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--study", action="store_true")
    args = ap.parse_args()
    print(build(Path(args.out), args.seed))
    if args.study:
        study(Path(args.out))


if __name__ == "__main__":
    main()
