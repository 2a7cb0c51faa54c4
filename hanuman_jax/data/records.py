"""Pre-tokenized documents in ArrayRecord shards, and the manifest that ties them to a tokenizer.

One record per document: a little-endian header `<IB` (token count n, flags), then n int32 token
ids, then, when flag bit 0 is set, n uint8 loss-mask values (absent = every token is trained on).
`manifest.json` beside the shards names the tokenizer (SHA-256 of its .model file).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from hanuman_jax.data.schemas import DataError

SUFFIXES = (".array_record", ".arrayrecord")
MANIFEST = "manifest.json"
FORMAT = "hanuman_jax.tokens/1"
_HEADER = struct.Struct("<IB")
_HAS_MASK = 1


def encode(tokens: np.ndarray, loss_mask: np.ndarray) -> bytes:
    tokens = np.asarray(tokens, "<i4")
    mask = np.asarray(loss_mask, np.uint8)
    if mask.all():
        return _HEADER.pack(len(tokens), 0) + tokens.tobytes()
    return _HEADER.pack(len(tokens), _HAS_MASK) + tokens.tobytes() + mask.tobytes()


def decode(record: bytes) -> dict[str, np.ndarray]:
    if len(record) < _HEADER.size:
        raise ValueError("a truncated token record")
    n, flags = _HEADER.unpack_from(record)
    expected = _HEADER.size + 4 * n + (n if flags & _HAS_MASK else 0)
    if len(record) != expected:
        raise ValueError(f"a token record of {len(record)} bytes, expected {expected}")
    tokens = np.frombuffer(record, "<i4", n, _HEADER.size).astype(np.int32)
    if flags & _HAS_MASK:
        mask = np.frombuffer(record, np.uint8, n, _HEADER.size + 4 * n).astype(np.int32)
    else:
        mask = np.ones(n, np.int32)
    return {"tokens": tokens, "loss_mask": mask}


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of the file's bytes, read in chunks (a checkpoint's files can be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_manifest(shards: list[Path], tokenizer_sha256: str | None) -> None:
    """Every shard's directory holds a manifest made with this tokenizer."""
    for directory in sorted({p.parent for p in shards}):
        path = directory / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DataError(
                f"{path}: missing or unreadable; token shards need the manifest that "
                "`python -m hanuman_jax.data prepare` writes beside them"
            ) from None
        if manifest.get("format") != FORMAT:
            raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        made_with = manifest.get("tokenizer_sha256")
        if tokenizer_sha256 is not None and made_with != tokenizer_sha256:
            raise DataError(
                f"{directory}: tokenized with another tokenizer ({manifest.get('tokenizer')}, "
                f"sha256 {str(made_with)[:12]}…) than data.tokenizer (sha256 "
                f"{tokenizer_sha256[:12]}…); run prepare again with this tokenizer"
            )


def open_shards(paths: list[Path]):
    import grain

    try:
        return grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    except Exception as e:  # noqa: BLE001 (array_record raises RuntimeError/ValueError)
        raise DataError(f"{paths[0].parent}: unreadable ArrayRecord shards ({e})") from None


def write_shard(path: Path, encoded: list[bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    try:
        for record in encoded:
            writer.write(record)
    finally:
        writer.close()
