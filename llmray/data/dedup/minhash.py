"""Vectorised MinHash over word or character n-gram shingles, bit-identical to datasketch's `affine32` scheme.

A batch of documents becomes one flat array of shingle hashes (no Python loop per shingle or word),
the permutations `a*h + b mod 2^32` run as one (perms x shingles) uint32 product per slice of the
batch, and `np.minimum.reduceat` takes each document's minimum along contiguous rows. Given the same 32-bit shingle
hash as its `hashfunc`, `datasketch.MinHash(num_perm, seed)` yields the same hash values (tested).
Band keys fold each band's `rows` values into one uint64 so LSH buckets can be shuffled by key.
"""

from __future__ import annotations

import hashlib
import zlib
from itertools import chain
from typing import Sequence

import numpy as np

_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_MAX32 = np.uint32(0xFFFFFFFF)
# Elements of one (perms x shingles) product: the task's scratch buffer (16 MB of uint32).
# `python bench/dedup_sign.py FILE` times other sizes; on a 5,000-document file (800k shingles,
# 128 perms) 1-8 M elements took 0.058-0.071 s and 16 M (a buffer beyond the caches) 0.128 s.
_SLICE_ELEMENTS = 1 << 22


def words(text: str) -> list[str]:
    """Shingling tokens: lower-cased whitespace-separated words."""
    return text.lower().split()


def word_hash(word: str) -> int:
    return zlib.crc32(word.encode("utf-8"))


def shingle_hash_py(tokens: Sequence[str]) -> int:
    """Reference (slow) 32-bit hash of one shingle; the vectorised path must agree with it."""
    h = int(_FNV_OFFSET)
    for t in tokens:
        h = ((h ^ word_hash(t)) * int(_FNV_PRIME)) & 0xFFFFFFFFFFFFFFFF
    return ((h >> 32) ^ h) & 0xFFFFFFFF


def shingle_hash_of_bytes(data: bytes) -> int:
    """`hashfunc` for datasketch: shingle bytes are the n words joined by one space."""
    return shingle_hash_py(data.decode("utf-8").split(" "))


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of datasketch's affine32 scheme for `MinHash(num_perm, seed)`: a odd, both uint32."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch pre-mixes every input hash with it)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def normalise(text: str) -> str:
    """Shingling input: lower-cased, whitespace runs collapsed to one space."""
    return " ".join(text.lower().split())


def char_shingle_hash_py(chars: str) -> int:
    """Reference 32-bit hash of one character shingle (FNV over code points)."""
    h = int(_FNV_OFFSET)
    for c in chars:
        h = ((h ^ ord(c)) * int(_FNV_PRIME)) & 0xFFFFFFFFFFFFFFFF
    return ((h >> 32) ^ h) & 0xFFFFFFFF


def char_shingle_hash_of_bytes(data: bytes) -> int:
    """`hashfunc` for datasketch with character shingles (the shingle's UTF-8 bytes)."""
    return char_shingle_hash_py(data.decode("utf-8"))


def shingle_hashes(texts: Sequence[str], ngram: int, shingle: str = "word",
                   toks: Sequence[list[str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flat uint32 shingle hashes of a batch and `starts` (n_docs + 1 offsets into them).

    `shingle="word"`: n-grams of words; `"char"`: n-grams of code points of the normalised text.
    A document shorter than `ngram` tokens has one shingle (all of them); an empty one has none.
    Shingles never straddle two documents. `toks`: `words(t)` of every text when the caller has
    them already (one lower/split pass serves the exact hash too).
    """
    if toks is None:
        toks = [words(t) for t in texts]
    if shingle == "char":
        norm = [" ".join(t) for t in toks]  # == normalise(text)
        counts = np.fromiter((len(t) for t in norm), dtype=np.int64, count=len(norm))
        wh = np.frombuffer("".join(norm).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        short = lambda d: char_shingle_hash_py(norm[d])  # noqa: E731
    else:
        counts = np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
        wh = _word_hashes(toks)
        short = lambda d: shingle_hash_py(toks[d])  # noqa: E731
    return _ngram_hashes(wh, counts, ngram, short)


def _word_hashes(toks: Sequence[list[str]]) -> np.ndarray:
    """uint64 `word_hash` of every word of the batch, in order: Arrow dictionary-encodes the words
    (in C++), so crc32 runs once per distinct word and no Python loop runs per word."""
    import pyarrow as pa

    flat = list(chain.from_iterable(toks))
    if not flat:
        return np.zeros(0, dtype=np.uint64)
    enc = pa.array(flat, pa.large_string()).dictionary_encode()
    uniq = np.fromiter((word_hash(w) for w in enc.dictionary.to_pylist()), dtype=np.uint64, count=len(enc.dictionary))
    return uniq[enc.indices.to_numpy()]


def _ngram_hashes(wh: np.ndarray, counts: np.ndarray, ngram: int, short) -> tuple[np.ndarray, np.ndarray]:
    """FNV over every window of `ngram` token hashes inside each document; `short(d)` hashes a
    document with fewer tokens than `ngram`."""
    ends = np.cumsum(counts)
    begins = ends - counts
    n_sh = np.where(counts >= ngram, counts - ngram + 1, np.minimum(counts, 1))
    starts = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(n_sh, out=starts[1:])
    with np.errstate(over="ignore"):
        # Hash of the n-gram starting at every position of the flat array (straddling ones are
        # computed and then not selected).
        m = max(0, len(wh) - ngram + 1)
        h = np.full(m, _FNV_OFFSET, dtype=np.uint64)
        for j in range(ngram):
            h = (h ^ wh[j : j + m]) * _FNV_PRIME
        full = ((h >> np.uint64(32)) ^ h) & np.uint64(0xFFFFFFFF)
    out = np.empty(int(starts[-1]), dtype=np.uint32)
    long_docs = np.nonzero(counts >= ngram)[0]
    if len(long_docs):
        lens = n_sh[long_docs]
        src = np.repeat(begins[long_docs], lens) + _ragged_arange(lens)
        dst = np.repeat(starts[long_docs], lens) + _ragged_arange(lens)
        out[dst] = full[src]
    for d in np.nonzero((counts > 0) & (counts < ngram))[0]:
        out[starts[d]] = short(d)
    return out, starts


def _ragged_arange(lens: np.ndarray) -> np.ndarray:
    """[0..l0-1, 0..l1-1, ...] for lengths `lens`."""
    total = int(lens.sum())
    offs = np.repeat(np.cumsum(lens) - lens, lens)
    return np.arange(total, dtype=np.int64) - offs


def signatures(shingles: np.ndarray, starts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n_docs, num_perm) uint32 MinHash values; an empty document gets all 0xFFFFFFFF.

    Perm-major: each slice of `_SLICE_ELEMENTS // num_perm` shingles (cut anywhere, even inside a
    document) becomes a (num_perm x slice) product in one reused buffer, and `np.minimum.reduceat`
    runs along its contiguous rows. A document split over slices takes the minimum of its parts,
    so scratch memory stays bounded whatever the document lengths.
    """
    n_docs, num_perm = len(starts) - 1, len(a)
    sig_t = np.full((num_perm, n_docs), _MAX32, dtype=np.uint32)
    hv = fmix32(shingles.astype(np.uint32, copy=False))
    total = len(hv)
    docs = np.nonzero(starts[1:] > starts[:-1])[0]  # documents with at least one shingle
    doc_starts = starts[docs]  # strictly increasing; the first is 0 when there is any shingle
    step = max(1, _SLICE_ELEMENTS // max(1, num_perm))
    buf = np.empty((num_perm, min(step, total)), dtype=np.uint32)
    a_col, b_col = a.astype(np.uint32)[:, None], b.astype(np.uint32)[:, None]
    for s0 in range(0, total, step):
        s1 = min(s0 + step, total)
        i0 = int(np.searchsorted(doc_starts, s0, side="right")) - 1  # the document holding shingle s0
        i1 = int(np.searchsorted(doc_starts, s1, side="left"))  # documents starting before s1
        phv = buf[:, : s1 - s0]
        np.multiply(a_col, hv[None, s0:s1], out=phv)  # uint32 wraparound = mod 2^32
        phv += b_col
        local = np.maximum(doc_starts[i0:i1], s0) - s0
        mins = np.minimum.reduceat(phv, local, axis=1)
        cols = docs[i0:i1]
        if starts[cols[0]] < s0:  # continues from the previous slice
            mins[:, 0] = np.minimum(mins[:, 0], sig_t[:, cols[0]])
        sig_t[:, cols] = mins
    return np.ascontiguousarray(sig_t.T)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) uint64 keys; two documents share key k of band i iff their rows agree
    (up to 64-bit collisions). The band index is mixed in so bands never share buckets."""
    n = sig.shape[0]
    v = sig[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = np.broadcast_to((np.arange(bands, dtype=np.uint64) + np.uint64(1)) * _FNV_PRIME, (n, bands)).copy()
        h ^= _FNV_OFFSET
        for j in range(rows):
            h = (h ^ v[:, :, j]) * _FNV_PRIME
        h ^= h >> np.uint64(29)
    return h


def exact_hash(text: str) -> int:
    """64-bit hash of the text with case and whitespace normalised (exact dedup key)."""
    return exact_hash_of_words(words(text))


def exact_hash_of_words(toks: list[str]) -> int:
    """`exact_hash` of the text whose `words` are `toks`."""
    return int.from_bytes(hashlib.blake2b(" ".join(toks).encode("utf-8"), digest_size=8).digest(), "little")


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives at `threshold` (datasketch's
    optimiser, weights 0.5/0.5)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray | float:
    """Share of equal MinHash values: an unbiased estimate of Jaccard (rows of 2-D inputs)."""
    eq = np.asarray(sig_a) == np.asarray(sig_b)
    return eq.mean(axis=-1) if eq.ndim > 1 else float(eq.mean())
