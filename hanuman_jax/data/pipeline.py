"""The training input pipeline: sources -> tokens -> token-weighted mixture -> packed batches.

Every row of the global batch is its own *lane*: lane r reads records r, r+B, r+2B, ... of each
source's shuffled, endlessly repeated order (B = train.batch_size), mixes them and packs them.
A process builds only its own lanes, so it reads only its share of the data, and the global batch
is the same whatever the number of processes: a run can resume on a different host count.
"""

from __future__ import annotations

from pathlib import Path

import grain
import ml_collections
import numpy as np

from hanuman_jax.config import check_batch_divides
from hanuman_jax.data import records
from hanuman_jax.data.packing import PackedRows
from hanuman_jax.data.schedule import SeqLenSchedule
from hanuman_jax.data.schemas import DataError, Document
from hanuman_jax.data.sources import SKIP_REASONS, open_source
from hanuman_jax.data.tokens import tokenize_record

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
    from each lane, lane after lane."""

    def __init__(self, lanes: list[PackedRows], schedule: SeqLenSchedule):
        super().__init__(lanes)
        self._schedule = schedule

    def __iter__(self):
        return _LanesIterator([p.__iter__() for p in self._parents], self._schedule)

    def __str__(self) -> str:
        return f"Lanes({len(self._parents)}, {self._schedule})"


class _LanesIterator(grain.DatasetIterator):
    def __init__(self, parents, schedule: SeqLenSchedule):
        super().__init__(parents)
        self._schedule = schedule
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
        return {"lanes": [p.get_state() for p in self._parents], "batches": self._batches}

    def set_state(self, state: dict) -> None:
        if len(state["lanes"]) != len(self._parents):
            raise DataError(
                f"the checkpoint's data state has {len(state['lanes'])} lanes, this run "
                f"{len(self._parents)}: train.batch_size (or the process count) changed"
            )
        for parent, s in zip(self._parents, state["lanes"], strict=True):
            parent.set_state(s)
        self._batches = int(state.get("batches", 0))


def open_sources(specs, tokenizer_path: str | Path, field: str = "data.sources") -> list:
    sha = records.file_sha256(tokenizer_path)
    return [open_source(dict(spec), f"{field}[{i}]", sha) for i, spec in enumerate(specs)]


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
    full_length = SeqLenSchedule.constant(cfg.data.seq_len)
    ds = Lanes(lanes, full_length if eval_sources else SeqLenSchedule.from_config(cfg))
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
