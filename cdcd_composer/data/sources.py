"""Where stories come from: text files, JSON/JSONL, Parquet, the Hugging Face hub, the offline grammar.

Every reader streams: it yields one record per story (`str`, or `bytes` from text files, decoded
later in a worker) and never holds a whole file in memory. A record that cannot be a story (bad
JSON line, missing text field, a story longer than the byte budget) is yielded as `Skipped`
so it is counted rather than lost silently. Problems with a whole file (missing, binary, wrong
format, a glob matching nothing) raise `SourceError` with a one-line message naming the file.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

STORY_SEPARATOR = b'<|endoftext|>'
FORMATS = {'.txt': 'text', '.jsonl': 'jsonl', '.json': 'json', '.parquet': 'parquet'}
READ_CHUNK_BYTES = 1 << 22
BINARY_SNIFF_BYTES = 1 << 16


class SourceError(ValueError):
    """A source file or dataset cannot be read; the message names it and the fix."""


@dataclass(frozen=True)
class Skipped:
    """A record that is not a story; `reason` is one of the converter's skip counters."""

    reason: str


Record = str | bytes | Skipped


def expand_files(patterns: Iterable[str]) -> list[str]:
    """Expands paths and globs into a sorted, de-duplicated list of existing files.

    Raises:
        SourceError: a path does not exist, a glob matches nothing, or a format is unknown.
    """
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matched:
                raise SourceError(f'{pattern!r} matches no files: check the glob and quote it in the shell')
            files.extend(matched)
        elif os.path.isdir(pattern):
            raise SourceError(f'{pattern} is a directory: give files or a glob such as {pattern}/*.txt')
        elif not os.path.isfile(pattern):
            raise SourceError(f'{pattern} not found: check the path')
        else:
            files.append(pattern)
    for path in files:
        file_format(path)
    return list(dict.fromkeys(files))


def file_format(path: str) -> str:
    """'text' | 'jsonl' | 'json' | 'parquet', from the file extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise SourceError(f'{path}: unknown extension {ext!r}; expected one of {sorted(FORMATS)}')
    return FORMATS[ext]


def file_stories(path: str, text_column: str, max_story_bytes: int) -> Iterator[Record]:
    """The records of one file, in file order, by its format."""
    fmt = file_format(path)
    if fmt == 'text':
        return text_file_stories(path, max_story_bytes)
    if fmt == 'parquet':
        return parquet_stories(path, text_column)
    return json_stories(path, text_column, lines=fmt == 'jsonl')


def _refuse_binary(path: str, head: bytes) -> None:
    if b'\x00' in head:
        raise SourceError(f'{path} looks binary (it holds NUL bytes), not a text file: check the path')


def text_file_stories(path: str, max_story_bytes: int) -> Iterator[Record]:
    """Stories of a TinyStories text file, separated by `<|endoftext|>`, as raw bytes.

    Memory stays below `max_story_bytes` plus one read chunk: a story growing past the budget
    is dropped (yielded as `Skipped('too_long')`) while reading on to the next separator.
    """
    with open(path, 'rb') as f:
        head = f.read(BINARY_SNIFF_BYTES)
        _refuse_binary(path, head)
        pending, overflowed = head, False
        while True:
            chunk = f.read(READ_CHUNK_BYTES)
            *stories, pending = (pending + chunk).split(STORY_SEPARATOR)
            for i, story in enumerate(stories):
                if overflowed and i == 0:
                    overflowed = False
                    yield Skipped('too_long')
                else:
                    yield story
            if len(pending) > max_story_bytes:
                pending, overflowed = b'', True
            if not chunk:
                break
        if overflowed:
            yield Skipped('too_long')
        elif pending.strip():
            yield pending


def json_stories(path: str, text_column: str, *, lines: bool) -> Iterator[Record]:
    """Stories from JSON Lines (one object or string per line) or a JSON array (read whole)."""
    with open(path, 'rb') as f:
        _refuse_binary(path, f.read(BINARY_SNIFF_BYTES))
    if lines:
        with open(path, 'rb') as f:
            for line in f:
                if line.strip():
                    yield _json_text(line, text_column)
        return
    with open(path, 'rb') as f:
        try:
            rows = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f'{path} is not valid JSON ({e}); for one story per line use .jsonl') from e
    if not isinstance(rows, list):
        raise SourceError(f'{path}: expected a JSON array of stories or objects, got {type(rows).__name__}')
    for row in rows:
        yield _text_of(row, text_column)


def _json_text(line: bytes, text_column: str) -> Record:
    try:
        return _text_of(json.loads(line), text_column)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return Skipped('bad_record')


def _text_of(row: object, text_column: str) -> Record:
    if isinstance(row, dict):
        row = row.get(text_column)
    return row if isinstance(row, str) else Skipped('bad_record')


def parquet_stories(path: str, text_column: str, batch_rows: int = 4096) -> Iterator[Record]:
    """Stories from one string column of a Parquet file, read in row batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f'{path} is not a Parquet file ({e})') from e
    columns = parquet.schema_arrow.names
    if text_column not in columns:
        raise SourceError(f'{path} has no column {text_column!r} (columns: {columns}); set --text_column')
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_column]):
        for text in batch.column(0).to_pylist():
            yield text if isinstance(text, str) else Skipped('bad_record')


def hub_stories(dataset: str, split: str, text_column: str) -> Iterator[Record]:
    """Streams `text_column` of a Hugging Face hub dataset split (needs the internet)."""
    from datasets import load_dataset

    try:
        rows = iter(load_dataset(dataset, split=split, streaming=True))
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            if text_column not in row:
                raise SourceError(f'hub dataset {dataset!r} has no column {text_column!r}; set --text_column')
            yield _text_of(row[text_column], text_column)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "cannot read it".
        raise SourceError(f'cannot stream hub dataset {dataset!r} split {split!r}: {str(e)[:200]}') from e


def is_carved(index: int, fraction: float, seed: int) -> bool:
    """Whether story `index` of a source goes to the split carved out of it (fixed by `seed`).

    A hash of (seed, index), so the choice is streaming-friendly and the same on every run.
    """
    return zlib.crc32(f'{seed}:{index}'.encode()) < fraction * 2**32


def carve(records: Iterable[Record], fraction: float, seed: int, *, keep_carved: bool) -> Iterator[Record]:
    """The records chosen by `is_carved` (`keep_carved=True`) or the remaining ones."""
    for index, record in enumerate(records):
        if is_carved(index, fraction, seed) == keep_carved:
            yield record


def concat_files(files: list[str], text_column: str, max_story_bytes: int) -> Iterator[Record]:
    """The records of several files, one after another."""
    return itertools.chain.from_iterable(file_stories(f, text_column, max_story_bytes) for f in files)
