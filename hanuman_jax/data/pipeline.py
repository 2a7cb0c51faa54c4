"""The training input pipeline: sources -> tokens -> token-weighted mixture -> packed batches.

Every row of the global batch is its own *lane*: lane r reads records r, r+B, r+2B, ... of each
source's shuffled, endlessly repeated order (B = train.batch_size), mixes them and packs them.
A process builds only its own lanes, so it reads only its share of the data, and the global batch
is the same whatever the number of processes: a run can resume on a different host count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grain
import ml_collections
import numpy as np

from hanuman_jax.config import check_batch_divides
from hanuman_jax.data import records
from hanuman_jax.data.packing import PackedRows
from hanuman_jax.data.schedule import SeqLenSchedule
from hanuman_jax.data.schemas import DataError, Document
from hanuman_jax.data.sources import SKIP_REASONS, Concat, open_source
from hanuman_jax.data.tokens import tokenize_record

log = logging.getLogger("hanuman_jax")

# Lanes read synchronously; one prefetch thread runs the whole batch ahead of the trainer.
_SEQUENTIAL = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
MAX_CONSECUTIVE_SKIPS = 10_000  # a source this broken stops the run instead of spinning


class Tokenize(grain.transforms.Map):
    """`tokenize_record` as a Grain transform."""

    def __init__(self, tokenizer_path: str | Path, strict: bool = False):
        self.tokenizer_path = str(tokenizer_path)
        self.strict = strict

    def map(self, record) -> dict[str, np.ndarray]:
        return tokenize_record(record, self.tokenizer_path, self.strict)


class TokenMix(grain.IterDataset):
    """Interleaves sources so that each one's share of *tokens* follows its weight.

    The next document comes from the source furthest below its share (tokens so far / weight,
    ties to the lower index): deterministic, exact to within one document, and resumable from
    the children's states plus the token counts. Each element gains a `source` index.
    """

    def __init__(self, parents: list[grain.IterDataset], weights: list[float]):
        super().__init__(parents)
        self._weights = [float(w) for w in weights]

    def __iter__(self):
        return _TokenMixIterator([p.__iter__() for p in self._parents], self._weights)

    def __str__(self) -> str:
        return f"TokenMix(weights={self._weights})"


class _TokenMixIterator(grain.DatasetIterator):
    def __init__(self, parents, weights):
        super().__init__(parents)
        self._weights = weights
        self._tokens = [0] * len(weights)
        self._skips = [0] * len(weights)

    def __next__(self):
        s = min(range(len(self._weights)), key=lambda i: (self._tokens[i] / self._weights[i], i))
        element = next(self._parents[s])
        if "skip" in element:
            self._skips[s] += 1
            if self._skips[s] > MAX_CONSECUTIVE_SKIPS:
                raise DataError(
                    f"data.sources[{s}]: {MAX_CONSECUTIVE_SKIPS} unusable records in a row "
                    "(see the data/skipped_* metrics); check the files"
                )
        else:
            self._skips[s] = 0
            self._tokens[s] += len(element["tokens"])
        return {**element, "source": np.int32(s)}

    def get_state(self) -> dict:
        return {
            "parents": [p.get_state() for p in self._parents],
            "tokens": list(self._tokens),
            "skips": list(self._skips),
        }

    def set_state(self, state: dict) -> None:
        for parent, s in zip(self._parents, state["parents"], strict=True):
            parent.set_state(s)
        self._tokens = list(state["tokens"])
        self._skips = list(state["skips"])


class Lanes(grain.IterDataset):
    """Stacks the rows of all lanes into a batch, and sums the lanes' data counters into
    `batch["stats"]` (host-side: the trainer logs it, it never reaches the device).

    Batch i takes `schedule.rows_per_lane(i)` consecutive rows of `schedule.length(i)` tokens
    from each lane, lane after lane. `sources`: each data.sources entry's `fingerprint`, kept in
    the iterator's state, so that a resume can tell whether the files under the position changed."""

    def __init__(
        self, lanes: list[PackedRows], schedule: SeqLenSchedule, sources: list[dict] | None = None
    ):
        super().__init__(lanes)
        self._schedule, self._sources = schedule, sources

    def __iter__(self):
        return _LanesIterator([p.__iter__() for p in self._parents], self._schedule, self._sources)

    def __str__(self) -> str:
        return f"Lanes({len(self._parents)}, {self._schedule})"


class _LanesIterator(grain.DatasetIterator):
    def __init__(self, parents, schedule: SeqLenSchedule, sources: list[dict] | None):
        super().__init__(parents)
        self._schedule, self._sources = schedule, sources
        self._batches = 0  # batches produced: the step the next one is for

    def __next__(self):
        n = self._schedule.length(self._batches)
        count = self._schedule.rows_per_lane(self._batches)
        rows = [p.next_row(n) for p in self._parents for _ in range(count)]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "stats"}
        per_lane = len(rows) // len(self._parents)
        last = rows[per_lane - 1 :: per_lane]  # the counters are cumulative: each lane's newest
        batch["stats"] = {k: sum(r["stats"][k] for r in last) for k in rows[0]["stats"]}
        self._batches += 1
        return batch

    def get_state(self) -> dict:
        state = {"lanes": [p.get_state() for p in self._parents], "batches": self._batches}
        return state if self._sources is None else state | {"sources": self._sources}

    def set_state(self, state: dict) -> None:
        """Restores the position; DataError when it cannot fit this pipeline, and a warning for
        each source whose files changed under it (the position is kept: `warn_changed`)."""
        if len(state["lanes"]) != len(self._parents):
            raise DataError(
                f"the checkpoint's data state has {len(state['lanes'])} lanes, this run "
                f"{len(self._parents)}: train.batch_size (or the process count) changed"
            )
        saved = state.get("sources")  # None in a position saved before sources were recorded
        if saved is not None and self._sources is not None:
            if len(saved) != len(self._sources):
                raise DataError(
                    f"the checkpoint's data state reads {len(saved)} data.sources, this run "
                    f"{len(self._sources)}"
                )
            warn_changed(saved, self._sources)
        for parent, s in zip(self._parents, state["lanes"], strict=True):
            parent.set_state(s)
        self._batches = int(state.get("batches", 0))


def open_sources(specs, tokenizer_path: str | Path, field: str = "data.sources") -> list:
    sha = records.file_sha256(tokenizer_path)
    return [open_source(dict(spec), f"{field}[{i}]", sha) for i, spec in enumerate(specs)]


def fingerprint(spec: dict, source) -> dict:
    """What a data position records of one data.sources entry, to tell on resume whether its
    files changed under it: each file as a shard manifest lists it (`records.shard_entry`: name,
    records, size and a SHA-256 of its first and last 64 KiB, cheap at every start), a library's
    dataset by its name and length. Not the mtime: a copy of the same bytes is the same data."""
    files = []
    for part in source.parts if isinstance(source, Concat) else [source]:
        path = getattr(part, "path", None) or getattr(getattr(part, "index", None), "path", None)
        files.append(records.shard_entry(path, len(part)) if path
                     else {"name": part.name, "documents": len(part)})  # fmt: skip
    return {"path": spec["path"], "files": files}


def warn_changed(saved: list[dict], now: list[dict]) -> None:
    """One warning per data.sources entry whose files are not those its position was saved over.
    The position is kept, as a resume with other data is the user's to make (cleaned or grown
    files, prepare run again): it is a record number per source, read in the files as they are."""
    for i, (then, current) in enumerate(zip(saved, now, strict=True)):
        if then["files"] != current["files"]:
            log.warning(
                "data.sources[%d] %r: %s since the checkpoint was saved; its data position is "
                "kept as it is, so the run goes on at the same record numbers of the files as "
                "they are now (some records may be read twice, others never)",
                i, current["path"], _file_changes(then["files"], current["files"]),
            )  # fmt: skip


def _file_changes(then: list[dict], now: list[dict]) -> str:
    """`a.txt changed (120 records then, 130 now); b.txt is new` for `warn_changed`."""
    old, new = {e["name"]: e for e in then}, {e["name"]: e for e in now}
    changes = [f"{name} is gone" for name in old if name not in new]
    changes += [f"{name} is new" for name in new if name not in old]
    for name in (n for n in new if n in old and new[n] != old[n]):
        a, b = old[name], new[name]
        if a["documents"] != b["documents"]:
            what = f"{a['documents']} records then, {b['documents']} now"
        elif a.get("bytes") != b.get("bytes"):
            what = f"{a.get('bytes')} bytes then, {b.get('bytes')} now"
        else:
            what = "as many records and bytes, but other bytes at its start or end"
        changes.append(f"{name} changed ({what})")
    more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
    return "; ".join(changes[:3]) + more if changes else "its files are in another order"


def position_changes(saved: dict, cfg: ml_collections.ConfigDict) -> list[str]:
    """What changed since a data position was saved under config `saved` (a dict) that it cannot
    carry over to `cfg`: it holds a lane per row of train.batch_size, each a mixture of
    data.sources by their number, a record number in each source's own files (a source given
    another path is refused; a file changed under the same path is `warn_changed`'s)."""
    changes = []
    batch = saved.get("train", {}).get("batch_size")
    if batch not in (None, cfg.train.batch_size):
        changes.append(f"train.batch_size {batch} -> {cfg.train.batch_size}")
    then = [s.get("path") for s in saved.get("data", {}).get("sources", [])]
    now = [s["path"] for s in cfg.data.sources]
    if then and len(then) != len(now):
        which = [f"{p!r} added" for p in now if p not in then]
        which += [f"{p!r} removed" for p in then if p not in now]
        named = f" ({', '.join(which)})" if which else ""
        changes.append(f"data.sources {len(then)} entries -> {len(now)}{named}")
    elif then:
        changes += [f"data.sources[{i}] {a!r} -> {b!r}"
                    for i, (a, b) in enumerate(zip(then, now, strict=True)) if a != b]  # fmt: skip
    return changes


def _sample(source, limit: int, seed: int):
    """A seeded sample of `limit` records, in source order (the seed samples 10k this way)."""
    if not 0 < limit < len(source):
        return source
    return _Subset(source, np.sort(np.random.default_rng(seed).choice(len(source), limit, False)))


class _Subset:
    def __init__(self, source, keep: np.ndarray):
        self.source, self.keep = source, keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int):
        return self.source[int(self.keep[i])]


def make_dataset(
    cfg: ml_collections.ConfigDict,
    tokenizer_path: str | Path,
    *,
    process_index: int = 0,
    process_count: int = 1,
    eval_sources: bool = False,
    prefetch: int = 4,
) -> grain.IterDataset:
    """An endless, deterministic stream of this process's batches of packed rows.

    Each batch holds `tokens`, `segment_ids` (document pieces numbered from 1 in each row, 0 for
    padding), `positions` (from 0 in each piece) and `loss_mask`, all int32 of shape
    [local_batch, seq_len], plus host-side `stats` (cumulative counters of these lanes). Under
    `data.seq_len_schedule` batch i is [local_batch x seq_len / L, L] for its phase's L.
    `eval_sources=True` reads `data.eval_sources` in file order (no shuffling), at full length.
    """
    batch = cfg.train.batch_size
    check_batch_divides(batch, 1, process_count, f"the {process_count} processes")
    specs = cfg.data.eval_sources if eval_sources else cfg.data.sources
    field = "data.eval_sources" if eval_sources else "data.sources"
    sources = open_sources(specs, tokenizer_path, field)
    streams = []
    for i, (spec, source) in enumerate(zip(specs, sources, strict=True)):
        if len(source) == 0:
            raise DataError(f"{field}[{i}] {spec['path']!r} holds no documents")
        ds = grain.MapDataset.source(
            _sample(source, spec.get("max_examples", 0), cfg.train.seed + i)
        )
        if not eval_sources:
            ds = ds.shuffle(seed=cfg.train.seed + i)
        streams.append(ds.repeat())
    weights = [float(spec.get("weight", 1.0)) for spec in specs]
    tokenize = Tokenize(tokenizer_path, strict=cfg.data.strict)
    local = batch // process_count
    lanes = []
    for lane in range(process_index * local, (process_index + 1) * local):
        parts = [s[lane::batch].map(tokenize).to_iter_dataset(_SEQUENTIAL) for s in streams]
        mixed = TokenMix(parts, weights)
        lanes.append(PackedRows(mixed, cfg.data.seq_len, mode=cfg.data.packing,
                                num_sources=len(specs)))  # fmt: skip
    if eval_sources:  # read from the start every time: no position to resume
        ds = Lanes(lanes, SeqLenSchedule.constant(cfg.data.seq_len))
    else:
        marks = [fingerprint(spec, source) for spec, source in zip(specs, sources, strict=True)]
        ds = Lanes(lanes, SeqLenSchedule.from_config(cfg), marks)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def read_documents(path: Path, field_map: dict[str, str] | None = None) -> list[Document]:
    """Every usable document of one local file (for tools and tests; training streams)."""
    source = open_source({"path": str(path), "field_map": field_map}, str(path))
    return [doc for doc in (source[i] for i in range(len(source))) if isinstance(doc, Document)]


def stats_metrics(stats: dict) -> dict[str, float | int]:
    """Flat metrics from a batch's cumulative `stats` (summed over lanes and processes)."""
    out = {f"data/skipped_{r}": int(n) for r, n in zip(SKIP_REASONS, stats["skipped"], strict=True)}
    placed = np.asarray(stats["source_tokens"], np.float64)
    total = placed.sum() + float(stats["padding"])
    for i, n in enumerate(placed):
        out[f"data/source_{i}_token_share"] = float(n / max(placed.sum(), 1))
    out["data/padding_share"] = float(stats["padding"]) / max(total, 1)
    return out
