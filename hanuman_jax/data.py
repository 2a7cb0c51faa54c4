"""Grain input pipeline: text / JSONL files -> token ids -> packed fixed-length rows -> batches."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

import grain
import ml_collections
import numpy as np

from hanuman_jax.packing import PackedRows
from hanuman_jax.schemas import DataError, Document, row_to_document
from hanuman_jax.tokenizer import Tokenizer

BUNDLED_DIR = Path(__file__).parent / "assets" / "sample"
BUNDLED_PREFIX = "bundled:"


def resolve_paths(pattern: str) -> list[Path]:
    """`bundled:GLOB` names files shipped in the package; anything else is a path or glob."""
    if pattern.startswith(BUNDLED_PREFIX):
        pattern = str(BUNDLED_DIR / pattern[len(BUNDLED_PREFIX) :])
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    if not paths:
        raise DataError(f"{pattern!r} matches no file")
    return paths


def resolve_file(path: str) -> Path:
    return resolve_paths(path)[0]


def iter_records(path: Path, progress=None) -> Iterator[tuple[str, object]]:
    """(where, value) for each non-empty line: the parsed object of a .jsonl line, else the line.

    Undecodable, unreadable or malformed input raises DataError naming the file and line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if progress is not None:
                    progress(len(line.encode("utf-8")))
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                if path.suffix != ".jsonl":
                    yield where, line.rstrip("\n")
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg})") from None
                yield where, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None


def read_documents(path: Path, field_map: dict[str, str] | None = None) -> list[Document]:
    """Plain text: one document per non-empty line. JSONL: one row per line (see schemas.py)."""
    if path.suffix == ".jsonl":
        docs = (row_to_document(row, where, field_map) for where, row in iter_records(path))
        return [doc for doc in docs if doc is not None]
    return [Document(text=text) for _, text in iter_records(path)]


class Tokenize(grain.transforms.Map):
    """Document -> {'tokens', 'loss_mask'}; a chat trains only on the assistant's tokens."""

    def __init__(self, tokenizer_path: str | Path):
        self.tokenizer_path = str(tokenizer_path)
        self._tokenizer = None

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path, "_tokenizer": None}

    def map(self, doc: Document) -> dict[str, np.ndarray]:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path)
        if doc.messages is not None:
            ids, mask = self._tokenizer.encode_chat(doc.messages)
        else:
            ids = self._tokenizer.encode_document(doc.text)
            mask = [1] * len(ids)
        return {"tokens": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}


def make_dataset(
    cfg: ml_collections.ConfigDict,
    tokenizer_path: str | Path,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """An endless, deterministic stream of this process's batches of packed rows.

    Each batch holds `tokens`, `segment_ids` (document pieces numbered from 1 in each row),
    `positions` (from 0 in each piece) and `loss_mask`, all int32 of shape [local_batch, seq_len].
    """
    seq_len = cfg.data.seq_len
    if cfg.train.batch_size % process_count:
        raise DataError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by the "
            f"{process_count} processes"
        )
    sources, weights = [], []
    for i, src in enumerate(cfg.data.sources):
        fmap = src.get("field_map")
        docs = [d for p in resolve_paths(src["path"]) for d in read_documents(p, fmap)]
        if not docs:
            raise DataError(f"data.sources[{i}] {src['path']!r} holds no documents")
        limit = src.get("max_examples", 0)
        if 0 < limit < len(docs):  # a seeded sample, in file order (the seed samples 10k this way)
            keep = np.random.default_rng(cfg.train.seed + i).choice(len(docs), limit, replace=False)
            docs = [docs[j] for j in sorted(keep)]
        sources.append(grain.MapDataset.source(docs).shuffle(seed=cfg.train.seed + i).repeat())
        weights.append(float(src.get("weight", 1.0)))
    ds = sources[0] if len(sources) == 1 else grain.MapDataset.mix(sources, weights)
    ds = ds[process_index::process_count].map(Tokenize(tokenizer_path)).to_iter_dataset()
    ds = PackedRows(ds, seq_len).batch(cfg.train.batch_size // process_count, drop_remainder=True)
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=4)
