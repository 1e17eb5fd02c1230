"""How a worker-group method is spread over ranks: `split` a batch, `broadcast` the call, or `rank0` only.

A worker class declares it per method:

    class RolloutWorker:
        @register("split", offset_kwarg="index_offset")
        def generate(self, prompt_ids, sampling, index_offset=0): ...

        @register("broadcast")
        def load_weights(self, bucket): ...

`split`: every list/tuple argument (and every `Batch`-like object with `.split(n)` and a class
method `concat(parts)`) is cut into `num_workers` contiguous chunks, sizes differing by at most one
(the first ranks get the extra items); other arguments go to every rank unchanged. Every rank is
called, even with an empty chunk, because a training group's ranks must all enter their
collectives. Results are gathered in rank order: lists are concatenated, `Batch`-like results are
`concat`-ed, `None`s give `None`, anything else gives the list of per-rank results.
`offset_kwarg` (optional) names a keyword that receives the global index of the rank's first item,
so a worker can number its items globally (e.g. `prompt_index`).

`broadcast`: same arguments to every rank; returns the list of per-rank results.
`rank0`: rank 0 only; returns its result.
Undeclared methods default to `broadcast`.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

Dispatch = Literal["split", "broadcast", "rank0"]
DISPATCH_MODES: tuple[str, ...] = ("split", "broadcast", "rank0")
_ATTR = "_llmray_dispatch"


def register(dispatch: Dispatch, offset_kwarg: str | None = None) -> Callable:
    """Decorator: declare how a worker method is dispatched over the group's ranks."""
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")

    def wrap(fn: Callable) -> Callable:
        setattr(fn, _ATTR, {"mode": dispatch, "offset_kwarg": offset_kwarg})
        return fn

    return wrap


def declared(worker_cls: type, method: str) -> dict[str, Any]:
    """{"mode", "offset_kwarg"} declared on `worker_cls.method` (broadcast when undeclared)."""
    fn = getattr(worker_cls, method, None)
    if fn is None or not callable(fn):
        raise AttributeError(f"{worker_cls.__name__} has no method {method!r}")
    return getattr(fn, _ATTR, None) or {"mode": "broadcast", "offset_kwarg": None}


def _is_batch(x: Any) -> bool:
    if isinstance(x, (str, bytes, dict)):
        return False
    return callable(getattr(x, "split", None)) and callable(getattr(type(x), "concat", None))


def _splittable(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or _is_batch(x)


def chunk_bounds(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges, sizes differing by at most one, bigger chunks first."""
    base, extra = divmod(n_items, n_parts)
    bounds, start = [], 0
    for r in range(n_parts):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _len(x: Any) -> int | None:
    try:
        return len(x)
    except TypeError:  # a Batch without __len__: its own split() decides the chunks
        return None


def _split_one(x: Any, n: int, bounds: list[tuple[int, int]]) -> list[Any]:
    if _is_batch(x):
        parts = list(x.split(n))
        if len(parts) != n:
            raise ValueError(f"{type(x).__name__}.split({n}) returned {len(parts)} parts")
        return parts
    return [x[a:b] for a, b in bounds]


def split_args(args: tuple, kwargs: dict, n: int, offset_kwarg: str | None = None) -> list[tuple[tuple, dict]]:
    """Per-rank (args, kwargs) for a `split` call. All split arguments must have the same length."""
    lengths = {i: _len(a) for i, a in enumerate(args) if _splittable(a)}
    lengths.update({k: _len(v) for k, v in kwargs.items() if _splittable(v)})
    if not lengths:
        raise ValueError("split dispatch needs at least one list or Batch argument")
    sizes = {v for v in lengths.values() if v is not None}
    if len(sizes) > 1:
        raise ValueError(f"split dispatch: list arguments differ in length {lengths}")
    bounds = chunk_bounds(sizes.pop() if sizes else 0, n)
    per_rank: list[tuple[list, dict]] = [([], {}) for _ in range(n)]
    for i, a in enumerate(args):
        parts = _split_one(a, n, bounds) if i in lengths else [a] * n
        for r in range(n):
            per_rank[r][0].append(parts[r])
    for k, v in kwargs.items():
        parts = _split_one(v, n, bounds) if k in lengths else [v] * n
        for r in range(n):
            per_rank[r][1][k] = parts[r]
    out = []
    for r, (a, kw) in enumerate(per_rank):
        if offset_kwarg:
            kw[offset_kwarg] = bounds[r][0]
        out.append((tuple(a), kw))
    return out


def gather(results: list[Any]) -> Any:
    """Rank-ordered results of a `split` call merged back into one."""
    if all(r is None for r in results):
        return None
    if all(isinstance(r, list) for r in results):
        return [item for r in results for item in r]
    if results and all(_is_batch(r) for r in results):
        return type(results[0]).concat(results)
    return results
