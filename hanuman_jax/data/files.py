"""Local files: path globs, a streaming record reader, and byte-offset indexes for random access."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hanuman_jax.data.schemas import DataError, Skip, read_record

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "sample"
BUNDLED_PREFIX = "bundled:"
_CHUNK = 1 << 26  # bytes scanned at a time when indexing a file


def resolve_paths(pattern: str) -> list[Path]:
    """`bundled:GLOB` names files shipped in the package; anything else is a path or glob."""
    if pattern.startswith(BUNDLED_PREFIX):
        pattern = str(BUNDLED_DIR / pattern[len(BUNDLED_PREFIX) :])
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise DataError(f"{pattern!r} matches no file")
    return paths


def resolve_file(path: str) -> Path:
    return resolve_paths(path)[0]


def parse_line(line: str, jsonl: bool) -> object:
    """A .jsonl line's JSON value, else the line; a leading byte-order mark (U+FEFF, which some
    Windows editors write at a file's start) belongs to neither."""
    line = line.removeprefix("\ufeff")
    return json.loads(line) if jsonl else line


def iter_records(path: Path, progress=None) -> Iterator[tuple[str, object]]:
    """(where, value) for each non-empty line: the parsed object of a .jsonl line, else the line.

    Streams the file. Undecodable, unreadable or malformed input raises DataError naming the file
    and line (the tokenizer trainer wants that; the training pipeline skips and counts instead).
    """
    jsonl = path.suffix == ".jsonl"
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if progress is not None:
                    progress(len(line.encode("utf-8")))
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                value = read_record(where, parse_line, line.rstrip("\n"), jsonl)
                if isinstance(value, Skip):
                    raise DataError(f"{where}: {value.message}")
                yield where, value
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None


class LineIndex:
    """Byte spans of a text file's records, found without decoding it: random access in O(1).

    `paragraphs=False`: every non-empty line is a record. `paragraphs=True`: a record is a run of
    non-blank lines, records being separated by blank lines. Spans exclude the line terminators
    at their ends; `lines[i]` is the 1-based line number where record i starts (for messages).
    Memory: 20 bytes per record, so a 10 M-line corpus costs 200 MB of index, not its text.
    """

    def __init__(self, path: Path, *, paragraphs: bool = False):
        self.path = path
        try:
            size = path.stat().st_size
            newlines = []
            with open(path, "rb") as f:
                offset = 0
                while chunk := f.read(_CHUNK):
                    found = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
                    newlines.append(found.astype(np.int64) + offset)
                    offset += len(chunk)
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror})") from None
        nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
        starts = np.concatenate([[0], nl + 1]).astype(np.int64)
        ends = np.concatenate([nl, [size]]).astype(np.int64)
        if len(starts) and starts[-1] >= size:  # no line after a final newline
            starts, ends = starts[:-1], ends[:-1]
        lineno = np.arange(1, len(starts) + 1, dtype=np.int64)
        ends = self._strip_cr(path, starts, ends)
        blank = ends <= starts
        if paragraphs:
            starts, ends, lineno = self._paragraphs(path, starts, ends, lineno, blank)
        else:
            keep = ~blank
            starts, ends, lineno = starts[keep], ends[keep], lineno[keep]
        self.starts, self.ends, self.lines = starts, ends, lineno.astype(np.int32)
        self._file = None

    @staticmethod
    def _strip_cr(path: Path, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Windows line ends: a span's final '\\r' is not part of the record."""
        if not len(ends):  # an empty file; otherwise it has at least one byte to map
            return ends
        data = np.memmap(path, np.uint8, mode="r")
        nonempty = ends > starts
        has_cr = nonempty & (data[np.where(nonempty, ends - 1, 0)] == 13)
        return ends - has_cr.astype(np.int64)

    @staticmethod
    def _paragraphs(path, starts, ends, lineno, blank):
        """Groups runs of non-blank lines (whitespace-only lines count as blank)."""
        maybe = np.flatnonzero(~blank & (ends - starts <= 64))
        if len(maybe):
            with open(path, "rb") as f:
                for i in maybe:
                    f.seek(starts[i])
                    if not f.read(ends[i] - starts[i]).strip():
                        blank[i] = True
        first = ~blank & np.concatenate([[True], blank[:-1]])
        last = ~blank & np.concatenate([blank[1:], [True]])
        return starts[first], ends[last], lineno[first]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> bytes:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 (kept open for random access)
        start = int(self.starts[i])
        return os.pread(self._file.fileno(), int(self.ends[i]) - start, start)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}"

    def __getstate__(self):
        return {**self.__dict__, "_file": None}
