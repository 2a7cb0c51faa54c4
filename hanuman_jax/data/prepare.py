"""Tokenize a config's sources once into ArrayRecord shards that training then reads directly.

    python -m hanuman_jax.data prepare --config configs/X.py --output DIR [--config.a.b=v ...]

Writes DIR/sources_<i>/ (and DIR/eval_sources_<i>/) holding `shard-KKKKK-of-NNNNN.array_record`
files and, once all are written, a manifest.json naming the tokenizer and listing them (training
refuses shards it does not list as they are), then prints the `data.sources` to train with.
Records keep the source's order with unusable ones dropped (counted in the manifest), so with
a clean source the prepared run sees exactly the batches the raw one would.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from pathlib import Path

import tqdm

from hanuman_jax.data import records
from hanuman_jax.data.schemas import DataError
from hanuman_jax.data.sources import SKIP_REASONS, Skip, open_source
from hanuman_jax.data.tokens import tokenize_record
from hanuman_jax.tokenizer import Tokenizer

RECORDS_PER_SHARD = 50_000  # at most; a source of 100+ records is split over every worker
_worker_state: dict = {}


def _init_worker(spec: dict, where: str, tokenizer_path: str, strict: bool) -> None:
    _worker_state["source"] = open_source(spec, where, records.file_sha256(tokenizer_path))
    _worker_state["tokenizer"], _worker_state["strict"] = tokenizer_path, strict


def _write_shard(job: tuple[int, int, int, str]) -> tuple[dict, list[int], int]:
    """Tokenizes records [start, stop) into one shard; returns (its manifest entry, skips,
    tokens)."""
    start, stop, _, path = job
    source, strict = _worker_state["source"], _worker_state["strict"]
    encoded, skipped, tokens = [], [0] * len(SKIP_REASONS), 0
    for i in range(start, stop):
        record = source[i]
        if isinstance(record, Skip) and strict:
            raise record.error()
        if isinstance(record, Skip):
            skipped[SKIP_REASONS.index(record.reason)] += 1
            continue
        doc = tokenize_record(record, _worker_state["tokenizer"])
        tokens += len(doc["tokens"])
        encoded.append(records.encode(doc["tokens"], doc["loss_mask"]))
    records.write_shard(Path(path), encoded)
    return records.shard_entry(Path(path), len(encoded)), skipped, tokens


def prepare_source(spec: dict, where: str, tokenizer_path: Path, out: Path, *,
                   strict: bool = False, workers: int | None = None) -> dict:  # fmt: skip
    """Tokenizes one source into `out`; returns its manifest."""
    source = open_source(spec, where)  # fails here, with the file named, before any work
    n = len(source)
    workers = workers or os.cpu_count() or 1
    shards = max(1, math.ceil(n / RECORDS_PER_SHARD), min(workers, n // 100))
    out.mkdir(parents=True, exist_ok=True)
    (out / records.MANIFEST).unlink(missing_ok=True)  # first: it must not outlive its shards
    for old in out.glob("shard-*"):
        old.unlink()
    bounds = [n * k // shards for k in range(shards + 1)]
    jobs = [
        (bounds[k], bounds[k + 1], k, str(out / f"shard-{k:05d}-of-{shards:05d}.array_record"))
        for k in range(shards)
    ]
    workers = min(workers, shards)
    totals = {"documents": 0, "tokens": 0, "skipped": dict.fromkeys(SKIP_REASONS, 0), "shards": []}
    args = (spec, where, str(tokenizer_path), strict)
    with tqdm.tqdm(total=n, desc=where, unit="doc", disable=None) as bar:
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")  # jax and threads: never fork
            with ctx.Pool(workers, _init_worker, args) as pool:
                results = pool.imap(_write_shard, jobs)
                for job, result in zip(jobs, results, strict=True):
                    _add(totals, result)
                    bar.update(job[1] - job[0])
        else:
            _init_worker(*args)
            for job in jobs:
                _add(totals, _write_shard(job))
                bar.update(job[1] - job[0])
    manifest = {
        "format": records.FORMAT,
        "tokenizer": str(tokenizer_path),
        "tokenizer_sha256": records.file_sha256(tokenizer_path),
        "vocab_size": Tokenizer(tokenizer_path).vocab_size,
        "source": {k: v for k, v in spec.items() if k in ("path", "field_map", "format")},
        **totals,
    }
    records.write_manifest(out, manifest)  # last: a manifest means every shard is written
    return manifest


def _add(totals: dict, result: tuple[dict, list[int], int]) -> None:
    shard, skipped, tokens = result
    totals["shards"].append(shard)
    totals["documents"] += shard["documents"]
    totals["tokens"] += tokens
    for reason, count in zip(SKIP_REASONS, skipped, strict=True):
        totals["skipped"][reason] += count


def prepare(cfg, tokenizer_path: Path, output: Path, workers: int | None = None) -> dict:
    """Prepares data.sources and data.eval_sources; returns the source lists to train with."""
    result = {}
    for field in ("sources", "eval_sources"):
        prepared = []
        for i, spec in enumerate(cfg.data[field]):
            spec = dict(spec)
            out = output / f"{field}_{i}"
            manifest = prepare_source(spec, f"data.{field}[{i}]", tokenizer_path, out,
                                      strict=cfg.data.strict, workers=workers)  # fmt: skip
            if manifest["documents"] == 0:
                raise DataError(f"data.{field}[{i}] {spec['path']!r}: no usable documents")
            kept = {k: v for k, v in spec.items() if k in ("weight", "max_examples")}
            prepared.append({"path": str(out / "*.array_record"), **kept})
        result[field] = prepared
    return result
