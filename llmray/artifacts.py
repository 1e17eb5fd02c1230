"""Typed artifact directories passed between stages, each completed by a manifest written last.

An artifact is a directory (dataset, tokenizer, checkpoint, model, report) holding its data and a
`manifest.json` with the producer, config, metrics and the hashes of its inputs' manifests.
The manifest is written after the data, so a directory without one is incomplete. `publish`
builds an artifact in a sibling temporary directory and renames it into place, so readers never
see a half-written artifact at the final path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from llmray.errors import UserError

MANIFEST = "manifest.json"
Kind = Literal["corpus", "dataset", "tokenizer", "checkpoint", "model", "report", "eval"]
KINDS: tuple[str, ...] = ("corpus", "dataset", "tokenizer", "checkpoint", "model", "report", "eval")


class ArtifactError(UserError, RuntimeError):
    """An artifact is missing, incomplete, or of the wrong kind."""


@dataclass(frozen=True)
class Manifest:
    kind: str
    producer: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    inputs: dict[str, str]
    """Input artifact path -> its manifest hash: what this artifact was made from."""
    created_at: float

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True, default=str)


def manifest_path(path: str | Path) -> Path:
    return Path(path) / MANIFEST


def is_complete(path: str | Path, kind: str | None = None) -> bool:
    """True when `path` holds a readable manifest (of `kind`, if given)."""
    try:
        m = read_manifest(path)
    except ArtifactError:
        return False
    return kind is None or m.kind == kind


def read_manifest(path: str | Path) -> Manifest:
    p = manifest_path(path)
    if not p.is_file():
        raise ArtifactError(f"{path} is not a complete artifact (no {MANIFEST})")
    try:
        data = json.loads(p.read_text())
        return Manifest(**data)
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"{p} is unreadable: {e}") from None


def require(path: str | Path, kind: str) -> Manifest:
    """The manifest of a complete artifact of `kind` at `path`, or an error naming what is wrong."""
    if not Path(path).exists():
        raise ArtifactError(f"{kind} artifact not found: {path}")
    m = read_manifest(path)
    if m.kind != kind:
        raise ArtifactError(f"{path} is a {m.kind} artifact, expected {kind}")
    return m


def manifest_hash(path: str | Path) -> str:
    return hashlib.sha256(manifest_path(path).read_bytes()).hexdigest()[:16]


def write_manifest(
    path: str | Path,
    kind: str,
    producer: str,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    inputs: list[str | Path] | None = None,
) -> Manifest:
    """Write the completion marker. Call it last, after every data file is on disk."""
    if kind not in KINDS:
        raise ArtifactError(f"unknown artifact kind {kind!r}; allowed: {', '.join(KINDS)}")
    m = Manifest(
        kind=kind,
        producer=producer,
        config=config or {},
        metrics=metrics or {},
        inputs={str(p): manifest_hash(p) for p in (inputs or [])},
        created_at=time.time(),
    )
    target = manifest_path(path)
    tmp = target.with_name(f".{MANIFEST}.{uuid.uuid4().hex}")
    tmp.write_text(m.to_json())
    os.replace(tmp, target)  # atomic: readers see no manifest or the whole one
    return m


@contextlib.contextmanager
def publish(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Build an artifact in a temporary sibling directory, then move it to `path`.

    The body writes its files (and the manifest, last) into the yielded directory. On success the
    directory replaces `path`; on an exception it is removed and `path` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if not manifest_path(tmp).is_file():
            raise ArtifactError(f"artifact for {final} was built without a manifest")
        if final.exists():
            if not overwrite and is_complete(final):
                raise ArtifactError(f"{final} already exists")
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clear_incomplete(path: str | Path) -> bool:
    """Remove `path` if it exists without a manifest (a crashed writer's leftovers)."""
    p = Path(path)
    if p.exists() and not is_complete(p):
        shutil.rmtree(p, ignore_errors=True)
        return True
    return False
