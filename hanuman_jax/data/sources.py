"""Random-access data sources: local text / JSONL / Parquet / ArrayRecord, `hf:` and `tfds:`.

A source is a sequence: `len(source)` records, and `source[i]` is one of
- a `Document` (text or chat messages, see schemas.py),
- a pre-tokenized document `{"tokens", "loss_mask"}` (ArrayRecord shards from `data prepare`),
- a `Skip` naming a record that cannot be used (bad JSON or UTF-8, no text, missing fields).
Nothing is loaded whole except Parquet's needed columns (as Arrow buffers); text and JSONL files
are read through a byte-offset index, the others through their libraries' random access.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import Counter
from pathlib import Path

from hanuman_jax.config.fields import check
from hanuman_jax.data import records
from hanuman_jax.data.files import BUNDLED_DIR, BUNDLED_PREFIX, LineIndex, parse_line, resolve_paths
from hanuman_jax.data.schemas import (
    DETECT_SAMPLE,
    DataError,
    Document,
    Shape,
    Skip,
    detect_shape,
    map_fields,
    read_record,
    readable_fields,
    row_to_document,
)

SKIP_REASONS = ("malformed_json", "invalid_utf8", "empty", "missing_field")
DETECT_ROWS = 1000  # rows read at most, at start, to find DETECT_SAMPLE usable ones
# path: file or glob (.txt, .jsonl, .parquet, or .array_record token shards), hf:OWNER/NAME[:SPLIT]
# or tfds:NAME[/CONFIG]:SPLIT; weight: share of tokens; max_examples: seeded sample of at most this
# many documents (0 = all); field_map: our field name -> the row's (see schemas.py); format: text
# files as "lines" (a document per line) or "paragraphs" (blank-line separated); data_dir: tfds's
SOURCE_KEYS = ("path", "weight", "max_examples", "field_map", "format", "data_dir")
TEXT_FORMATS = ("lines", "paragraphs")


Record = Document | Skip | dict
log = logging.getLogger("hanuman_jax")


class TextSource:
    """Plain text: a document per non-empty line, or per blank-line-separated paragraph."""

    def __init__(self, path: Path, fmt: str = "lines"):
        self.index = LineIndex(path, paragraphs=fmt == "paragraphs")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Record:
        return read_record(self.index.where(i), self._document, i)

    def _document(self, i: int) -> Record:
        text = parse_line(self.index[i].decode("utf-8"), jsonl=False)
        if not text.strip():
            return Skip("empty", self.index.where(i), "an empty document")
        return Document(text=text.replace("\r\n", "\n"))


class RowSource:
    """Rows (dicts) in any container; each becomes a Document in the source's `Shape`.

    The shape is the one most of the first rows have (schemas.detect_shape), found when the
    source opens, so a file of an unknown form fails at once with one line listing its keys;
    later rows that do not fit it are skipped and counted, never read another way.
    """

    def __init__(self, name: str, field_map: dict | None):
        self.name = name
        self.field_map = dict(field_map) if field_map else None
        self.shape = self._detect()

    def where(self, i: int) -> str:
        """Row i's place, for messages: file:line, file[row i] or name[i]."""
        raise NotImplementedError

    def row(self, i: int) -> object:
        """Row i as its container holds it (or a Skip); may raise: see `read_record`."""
        raise NotImplementedError

    def _detect(self) -> Shape:
        rows = []
        for i in range(min(len(self), DETECT_ROWS)):
            where = self.where(i)
            row = read_record(where, self.row, i)
            if not isinstance(row, dict):
                continue
            try:
                rows.append((where, map_fields(row, where, self.field_map)))
            except DataError:
                if not rows:  # the first row names its keys; a later one is skipped when read
                    raise
            if len(rows) == DETECT_SAMPLE:
                break
        if not rows:
            raise DataError(f"{self.name}: no usable row among the first {DETECT_ROWS}")
        return detect_shape(rows)

    def __getitem__(self, i: int) -> Record:
        where = self.where(i)
        return read_record(where, self._document, i, where)

    def _document(self, i: int, where: str) -> Record:
        row = self.row(i)
        if isinstance(row, Skip):
            return row
        doc = row_to_document(row, where, self.field_map, self.shape)
        if doc is None or not any(t.strip() for t in doc.texts()):
            return Skip("empty", where, "a row with nothing to train on (no text, or no prompt "
                        "or no answer)")  # fmt: skip
        if doc.messages is not None and not any(
            m["role"] == "assistant" and m["content"].strip() for m in doc.messages
        ):
            return Skip("empty", where, "a chat with no assistant reply to train on")
        return doc


class JsonlSource(RowSource):
    def __init__(self, path: Path, field_map: dict | None = None):
        self.index = LineIndex(path)
        super().__init__(str(path), field_map)

    def __len__(self) -> int:
        return len(self.index)

    def where(self, i: int) -> str:
        return self.index.where(i)

    def row(self, i: int):
        line = self.index[i].decode("utf-8")
        if not line.strip():
            return Skip("empty", self.where(i), "an empty line")
        return parse_line(line, jsonl=True)


class ParquetSource(RowSource):
    """A Parquet file; only the columns the shapes read (or `field_map` names) are loaded, and
    held as Arrow arrays (no Python objects): other columns, of any size or type, are not read."""

    def __init__(self, path: Path, field_map: dict | None = None):
        pq = _optional("pyarrow.parquet", "parquet")
        try:
            names = pq.read_schema(path).names
            columns = self._columns(names, field_map, f"{path}[row 0]")
            table = pq.read_table(path, columns=columns)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 (pyarrow raises several types for bad files)
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        self.path = path
        self.columns = {name: table.column(name) for name in table.column_names}
        self.rows = table.num_rows
        super().__init__(str(path), field_map)

    def __len__(self) -> int:
        return self.rows

    def where(self, i: int) -> str:
        return f"{self.path}[row {i}]"

    def row(self, i: int):
        return {k: col[i].as_py() for k, col in self.columns.items()}

    @classmethod
    def _columns(cls, names: list[str], field_map: dict | None, where: str) -> list[str]:
        """The file's columns that `field_map` names, or (without one) that the shapes read."""
        if field_map:
            map_fields(dict.fromkeys(names), where, field_map)  # raises, naming the columns
            return [name for name in names if name in field_map.values()]
        columns = readable_fields(names)
        if not columns:  # raises, naming all the file's columns
            row_to_document(dict.fromkeys(names), where)
        return columns


class LibraryRows(RowSource):
    """Rows from a library's random-access dataset; a load failure is one line naming it."""

    def __init__(self, name: str, load, field_map: dict | None):
        try:
            self.ds = load()
        except Exception as e:  # noqa: BLE001 (hub, network, format, not found: all end here)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{name}: cannot be loaded ({reason})") from None
        super().__init__(name, field_map)

    def __len__(self) -> int:
        return len(self.ds)

    def where(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def row(self, i: int):
        return self.ds[i]


class HFSource(LibraryRows):
    """`hf:OWNER/NAME[:SPLIT]` through `datasets.load_dataset` (Arrow files, memory-mapped).

    A local directory (or `bundled:DIR`) works in place of OWNER/NAME, as in `datasets`, and so
    does a local .jsonl, .json, .parquet or .csv file (read by that format's builder).
    """

    BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

    def __init__(self, spec: str, field_map: dict | None = None):
        datasets = _optional("datasets", "hf")
        bundled = spec.startswith(BUNDLED_PREFIX)
        name, _, split = spec.removeprefix(BUNDLED_PREFIX).partition(":")
        name = str(BUNDLED_DIR / name) if bundled else name
        builder = self.BUILDERS.get(Path(name).suffix)
        if builder and Path(name).is_file():
            args, kwargs = (builder,), {"data_files": name}
        else:
            args, kwargs = (name,), {}
        load = lambda: datasets.load_dataset(*args, split=split or "train", **kwargs)  # noqa: E731
        super().__init__(f"hf:{spec}", load, field_map)


class TfdsSource(LibraryRows):
    """`tfds:NAME[/CONFIG]:SPLIT` through `tfds.data_source` (ArrayRecord, random access).

    Byte strings in the examples are decoded as UTF-8; `data_dir` defaults to TFDS's own.
    """

    def __init__(self, spec: str, field_map: dict | None = None, data_dir: str | None = None):
        tfds = _optional("tensorflow_datasets", "tfds")
        name, _, split = spec.partition(":")
        if not split:
            raise DataError(f"tfds:{spec}: name a split, e.g. tfds:{name}:train")
        load = lambda: tfds.data_source(name, split=split, data_dir=data_dir, download=False)  # noqa: E731
        super().__init__(f"tfds:{spec}", load, field_map)

    def row(self, i: int):
        row = _decode_bytes(self.ds[i])
        # A Sequence of dicts (chat turns) comes back as a dict of lists: turn it into turns.
        return {k: _rows(v) for k, v in row.items()} if isinstance(row, dict) else row


def _rows(value):
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) == 1:
            return [
                dict(zip(value, items, strict=True)) for items in zip(*value.values(), strict=True)
            ]
    return value


def _decode_bytes(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _decode_bytes(v) for k, v in value.items()}
    if hasattr(value, "tolist"):  # numpy scalars and arrays (of bytes, for sequences)
        return _decode_bytes(value.tolist())
    if isinstance(value, list):
        return [_decode_bytes(v) for v in value]
    return value


class TokenShard:
    """Pre-tokenized documents in an ArrayRecord shard written by `python -m hanuman_jax.data
    prepare` (checked against its manifest by `open_source`); an id past `vocab_size` stops."""

    def __init__(self, path: Path, vocab_size: int):
        self.source = records.open_shards([path])
        self.path, self.vocab_size = path, vocab_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Record:
        where = f"{self.path}[{i}]"
        record = read_record(where, lambda: records.decode(self.source[i]))
        if isinstance(record, dict):
            records.check_ids(record["tokens"], self.vocab_size, where)
        return record


class Concat:
    """Several sources read as one (the files of a glob)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.offsets = [0]
        for part in parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> Record:
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[k][i - self.offsets[k]]


def check_sources(sources, field: str) -> None:
    """Checks each `data.sources` / `data.eval_sources` entry's keys and values (not its files)."""
    for i, src in enumerate(sources):
        where = f"{field}[{i}]"
        check(
            isinstance(src, dict) and isinstance(src.get("path"), str),
            where,
            src,
            "must be a dict with a string 'path'",
        )
        extra = set(src) - set(SOURCE_KEYS)
        check(
            not extra, where, src, f"unknown keys {sorted(extra)}; valid: {', '.join(SOURCE_KEYS)}"
        )
        limit = src.get("max_examples", 0)
        check(
            isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0,
            f"{where}.max_examples",
            limit,
            "must be an integer >= 0 (0 = all)",
        )
        fmap = src.get("field_map", {})
        check(
            isinstance(fmap, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in fmap.items()),
            f"{where}.field_map",
            fmap,
            "must map our field names to the row's, e.g. {'instruction': 'question'}",
        )
        weight = src.get("weight", 1.0)
        check(
            isinstance(weight, (int, float))
            and not isinstance(weight, bool)
            and math.isfinite(weight)
            and weight > 0,
            f"{where}.weight",
            weight,
            "must be a finite number > 0",
        )
        fmt = src.get("format", "lines")
        check(fmt in TEXT_FORMATS, f"{where}.format", fmt, f"one of {', '.join(TEXT_FORMATS)}")
        path = src["path"]
        if path.startswith("tfds:"):
            check(":" in path[5:], f"{where}.path", path, "tfds:NAME[/CONFIG]:SPLIT")
        if path.startswith(("hf:", "tfds:")):
            check(len(path.split(":")[1]) > 0, f"{where}.path", path, "names no dataset")
        check(
            "data_dir" not in src or path.startswith("tfds:"),
            f"{where}.data_dir",
            src.get("data_dir"),
            "only for tfds: sources",
        )


def open_source(spec: dict, where: str, tokenizer_sha256: str | None = None):
    """The source a `data.sources[i]` entry names (checked by `check_sources`)."""
    path, fmap = spec["path"], spec.get("field_map")
    if path.startswith("hf:"):
        return _logged(where, [HFSource(path[3:], fmap)])
    if path.startswith("tfds:"):
        return _logged(where, [TfdsSource(path[5:], fmap, spec.get("data_dir"))])
    try:
        paths = resolve_paths(path)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    shards = [p for p in paths if p.suffix in records.SUFFIXES]
    if shards:
        if len(shards) != len(paths):
            raise DataError(f"{where}: {path!r} mixes ArrayRecord shards with other files")
        vocab_sizes = records.check_manifest(shards, tokenizer_sha256)
        parts = [TokenShard(p, v) for p, v in zip(shards, vocab_sizes, strict=True)]
    else:
        parts = []
        for p in paths:
            if p.suffix == ".jsonl":
                parts.append(JsonlSource(p, fmap))
            elif p.suffix == ".parquet":
                parts.append(ParquetSource(p, fmap))
            elif p.name != records.MANIFEST:
                parts.append(TextSource(p, spec.get("format", "lines")))
    return _logged(where, parts)


def _logged(where: str, parts: list):
    """The parts as one source, after a log line per shape their rows were found to have."""
    shapes = Counter(part.shape.describe() for part in parts if isinstance(part, RowSource))
    for shape, files in shapes.items():
        first = next(p for p in parts if isinstance(p, RowSource) and p.shape.describe() == shape)
        more = f" and {files - 1} more files" if files > 1 else ""
        log.info("%s: %s%s holds %s", where, first.name, more, shape)
    return parts[0] if len(parts) == 1 else Concat(parts)


def _optional(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"this source needs {module.split('.')[0]}: pip install 'hanuman_jax[{extra}]'"
        ) from None
