"""Pre-tokenized documents in ArrayRecord shards, and the manifest that ties them to a tokenizer.

One record per document: a little-endian header `<IB` (token count n, flags), then n int32 token
ids, then, when flag bit 0 is set, n uint8 loss-mask values (absent = every token is trained on).
`manifest.json` beside the shards, written last, names the tokenizer (SHA-256 of its .model file,
vocabulary size) and lists each shard as written; opening shards checks them against it, and
each record's token ids against the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from hanuman_jax.data.schemas import DataError

SUFFIXES = (".array_record", ".arrayrecord")
MANIFEST = "manifest.json"
FORMAT = "hanuman_jax.tokens/2"  # /2: the manifest lists its shards and the vocabulary size
_HEADER = struct.Struct("<IB")
_HAS_MASK = 1
_ENDS = 1 << 16  # bytes at each end of a shard that its manifest entry hashes


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


def shard_entry(path: Path, documents: int) -> dict:
    """A shard as its manifest lists it. Opening it checks the size and a SHA-256 of its first
    and last 64 KiB again: cheap at every start, and the first documents and ArrayRecord's index
    at the end differ between runs of prepare."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(_ENDS))
        f.seek(max(size - _ENDS, 0))
        digest.update(f.read())
    return {"name": path.name, "documents": documents, "bytes": size,
            "ends_sha256": digest.hexdigest()}  # fmt: skip


def write_manifest(directory: Path, manifest: dict) -> None:
    """Atomically (a crash leaves the old file or the new one, never a part)."""
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)


def _read_manifest(directory: Path, tokenizer_sha256: str | None) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(
            f"{path}: missing or unreadable; token shards need the manifest that "
            "`python -m hanuman_jax.data prepare` writes beside them once it has written them all"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: format {found!r}, expected {FORMAT!r}; run prepare again")
    made_with = manifest.get("tokenizer_sha256")
    if tokenizer_sha256 is not None and made_with != tokenizer_sha256:
        raise DataError(
            f"{directory}: tokenized with another tokenizer ({manifest.get('tokenizer')}, "
            f"sha256 {str(made_with)[:12]}…) than data.tokenizer (sha256 "
            f"{tokenizer_sha256[:12]}…); run prepare again with this tokenizer"
        )
    return manifest


def check_manifest(shards: list[Path], tokenizer_sha256: str | None) -> list[int]:
    """Each shard is listed, as it is now, by the manifest beside it, made with this tokenizer
    (a shard of a later run of prepare, finished or not, is refused); returns each one's
    vocabulary size."""
    manifests = {d: _read_manifest(d, tokenizer_sha256) for d in sorted({p.parent for p in shards})}
    listed = {d / e["name"]: e for d, m in manifests.items() for e in m["shards"]}
    for path in shards:
        entry = listed.get(path)
        if entry is None or entry != shard_entry(path, entry["documents"]):
            raise DataError(
                f"{path}: not as {path.parent / MANIFEST} lists it (written by another run of "
                "prepare, or one that did not finish); run prepare again"
            )
    return [manifests[p.parent]["vocab_size"] for p in shards]


def check_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """Token ids past the vocabulary stop the run here, naming the record, not as a NaN loss."""
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0]
        raise DataError(
            f"{where}: token id {bad} is outside the tokenizer's {vocab_size} ids; run prepare "
            "again with data.tokenizer"
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
