"""Where the clean-dedup sign task spends its time on one input file, step by step, in one process.

Calls the functions `llmray.data.pipeline.sign_file` calls (default dedup config: word 2-grams,
128 permutations, 42 x 3 bands), each timed alone (best of `--repeat`), then the MinHash product
at several slice sizes (`minhash._SLICE_ELEMENTS`; every size gives the same signatures, checked).

    python bench/dedup_sign.py /tmp/llmray-bench-dedup/corpus-200000/docs/part-00003.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best(fn, repeat: int):
    out, secs = None, float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        secs = min(secs, time.perf_counter() - t)
    return out, secs


def main() -> None:
    import numpy as np

    from llmray.data.config import DedupConfig
    from llmray.data.dedup import minhash as mh
    from llmray.data.readers import ReadErrors, read_chunks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="a JSONL input file (one clean-dedup task's input)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slices", type=int, nargs="*", default=[1 << 20, 1 << 21, 1 << 22, 1 << 23, 1 << 24])
    args = ap.parse_args()

    cfg = DedupConfig()
    bands, rows = cfg.band_shape()
    a, b = mh.permutations(cfg.num_perm, cfg.seed)

    def read():
        return [t for batch in read_chunks(args.file, "text", "id", (), 1 << 30, ReadErrors()) for t in batch["text"]]

    texts, t_read = best(read, args.repeat)
    toks, t_words = best(lambda: [mh.words(x) for x in texts], args.repeat)
    _, t_exact = best(lambda: np.fromiter(map(mh.exact_hash_of_words, toks), np.uint64, len(toks)), args.repeat)
    wh, t_wh = best(lambda: mh._word_hashes(toks), args.repeat)
    (sh, starts), t_sh = best(lambda: mh.shingle_hashes(texts, cfg.ngram, cfg.shingle, toks), args.repeat)
    sig, t_sig = best(lambda: mh.signatures(sh, starts, a, b), args.repeat)
    _, t_bands = best(lambda: mh.band_keys(sig, bands, rows), args.repeat)
    print(f"{args.file}: {len(texts)} documents, {len(wh)} words, {len(sh)} shingles, {cfg.num_perm} permutations")
    for name, secs in [("read JSONL", t_read), ("lower/split (words)", t_words), ("exact hash", t_exact),
                       ("word hashes", t_wh), ("shingle hashes (incl. word hashes)", t_sh),
                       (f"MinHash product (slice {mh._SLICE_ELEMENTS} elements)", t_sig), ("band keys", t_bands)]:
        print(f"  {name:<48} {secs:7.3f} s")
    default = mh._SLICE_ELEMENTS
    try:
        for n in args.slices:
            mh._SLICE_ELEMENTS = n
            got, secs = best(lambda: mh.signatures(sh, starts, a, b), args.repeat)
            same = bool(np.array_equal(got, sig))
            print(f"  MinHash product, slice {n:>9} elements ({n * 4 / 2**20:5.1f} MiB)  {secs:7.3f} s  same: {same}")
    finally:
        mh._SLICE_ELEMENTS = default


if __name__ == "__main__":
    main()
