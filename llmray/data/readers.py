"""Readers: resolve an input (path, directory, glob or pyarrow-filesystem URI) into files, and
read JSONL / Parquet files in chunks, skipping bad lines and corrupt files with file:line errors."""

from __future__ import annotations

import fnmatch
import glob as globlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from llmray.errors import UserError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def _fmt(path: str) -> str | None:
    name = path[:-3] if path.endswith(".gz") else path
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            return fmt
    return None


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or a `scheme://` URI."""
    import pyarrow.fs as pafs

    if "://" in uri and not uri.startswith("file://"):
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad URIs
            raise UserError(f"input {uri!r}: cannot open filesystem: {e}") from None
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(local).expanduser().absolute())


def resolve_files(uri: str) -> list[str]:
    """Sorted data files (`.jsonl`, `.json`, `.parquet`, optionally `.gz`) named by `uri`:
    a file, a directory (recursive; hidden files skipped), or a glob. Errors name the input."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""
    if any(c in path for c in "*?["):
        if isinstance(fs, pafs.LocalFileSystem):
            files = [p for p in globlib.glob(path, recursive=True) if Path(p).is_file()]
        else:
            base = path.split("*", 1)[0].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
    else:
        try:
            info = fs.get_file_info(path)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"input {uri!r} is unreadable: {e}") from None
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"input not found: {uri}")
        if info.type == pafs.FileType.File:
            files = [path]
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File]
    files = sorted(f for f in files if _fmt(f) and not any(p.startswith(".") for p in Path(f).parts[-1:]))
    if not files:
        raise UserError(f"input {uri!r} holds no .jsonl/.json/.parquet files")
    return [prefix + f for f in files]


@dataclass
class ReadErrors:
    """Bad input met while reading: (file, line or row group, message), plus how many rows it cost."""

    items: list[dict] = field(default_factory=list)

    def add(self, path: str, where: str, message: str) -> None:
        self.items.append({"file": path, "where": where, "error": message[:300]})


def read_chunks(uri: str, text_column: str, id_column: str, keep_columns: tuple[str, ...], chunk_rows: int,
                errors: ReadErrors) -> Iterator[dict[str, list]]:
    """Batches `{"id", "text", *keep_columns}` of up to `chunk_rows` rows from one file.

    A malformed JSONL line, or a row without a string text, is skipped and recorded with its line
    number. A corrupt Parquet file is skipped (rows already read stay) and recorded. A missing id
    becomes `<file name>:<line>` so ids stay unique and deterministic.
    """
    fmt = _fmt(uri)
    stem = uri.rsplit("/", 1)[-1]
    rows = _jsonl_rows(uri, text_column, errors) if fmt == "jsonl" else _parquet_rows(uri, text_column, errors)
    batch: dict[str, list] = {"id": [], "text": [], **{c: [] for c in keep_columns}}
    for where, row in rows:
        text = row.get(text_column)
        if not isinstance(text, str):
            errors.add(uri, where, f"{text_column!r} is {type(text).__name__}, not a string")
            continue
        doc_id = row.get(id_column)
        batch["id"].append(str(doc_id) if doc_id is not None else f"{stem}:{where.split()[-1]}")
        batch["text"].append(text)
        for c in keep_columns:
            v = row.get(c)
            batch[c].append(None if v is None else str(v))
        if len(batch["id"]) >= chunk_rows:
            yield batch
            batch = {k: [] for k in batch}
    if batch["id"]:
        yield batch


def _open(uri: str):
    fs, path = filesystem(uri)
    return fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None)


def _jsonl_rows(uri: str, text_column: str, errors: ReadErrors) -> Iterator[tuple[str, dict]]:
    import io

    try:
        stream = _open(uri)
    except Exception as e:  # noqa: BLE001
        errors.add(uri, "file", f"unreadable: {e}")
        return
    with stream, io.TextIOWrapper(stream, encoding="utf-8", errors="replace") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    errors.add(uri, f"line {n}", f"malformed JSON: {e}")
                    continue
                if not isinstance(row, dict):
                    errors.add(uri, f"line {n}", f"expected a JSON object, got {type(row).__name__}")
                    continue
                if text_column not in row:
                    errors.add(uri, f"line {n}", f"no {text_column!r} field (fields: {', '.join(sorted(row)[:8])})")
                    continue
                yield f"line {n}", row
        except OSError as e:  # truncated gzip and the like
            errors.add(uri, "file", f"read failed: {e}")


def _parquet_rows(uri: str, text_column: str, errors: ReadErrors) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
        if text_column not in pf.schema_arrow.names:
            raise MissingColumn(uri, text_column, pf.schema_arrow.names)
    except MissingColumn:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt footers raise ArrowInvalid/OSError
        errors.add(uri, "file", f"corrupt Parquet: {e}")
        return
    n = 0
    try:
        for rg in range(pf.num_row_groups):
            for row in pf.read_row_group(rg).to_pylist():
                n += 1
                yield f"row {n}", row
    except Exception as e:  # noqa: BLE001
        errors.add(uri, f"row group {rg}", f"corrupt Parquet: {e}")


class MissingColumn(UserError):
    def __init__(self, uri: str, column: str, found: list[str]):
        super().__init__(f"{uri}: no text column {column!r} (columns: {', '.join(found)}); set text_column")


def check_text_column(files: list[str], text_column: str, probe_files: int = 3) -> None:
    """Fail before any work when the first readable file has no `text_column` at all."""
    errors = ReadErrors()
    for uri in files[:probe_files]:
        if _fmt(uri) == "parquet":
            rows = _parquet_rows(uri, text_column, errors)  # raises MissingColumn
            next(rows, None)
            return
        seen = 0
        for _where, _row in _jsonl_rows(uri, text_column, errors):
            return
        for item in errors.items:
            if "no '" in item["error"]:
                seen += 1
        if seen:
            raise UserError(f"{uri}: no row has a {text_column!r} field ({errors.items[0]['where']}: "
                            f"{errors.items[0]['error']}); set text_column")
        errors = ReadErrors()
