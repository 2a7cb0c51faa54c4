"""Packing token documents into fixed-length rows, exactly resumable, with data counters.

Our own iterator rather than Grain's ConcatThenSplitIterDataset, which packs to one fixed length:
here each row's length is chosen when it is asked for (`data.seq_len_schedule`), a `whole` mode
pads rather than split a document, and the skip, per-source and padding counters travel in the
state. That state is small and plain: the parent's state before the current document, the offset
into it, and the counters.
"""

from __future__ import annotations

import grain
import numpy as np

from hanuman_jax.config import PACKING_MODES
from hanuman_jax.data.sources import SKIP_REASONS


class PackedRows(grain.IterDataset):
    """Rows of `seq_len` tokens built from a stream of documents.

    - `concat`: documents laid end to end; one that does not fit continues in the next row, so
      rows are always full.
    - `whole`: a document that does not fit in what is left of a row starts the next one, and
      the rest of the row is padding (segment id 0); only documents longer than a row are split.
      For chat data, where a reply cut from its prompt trains on little.
    Each row holds `tokens`, `loss_mask`, `segment_ids` (1, 2, ... per document piece, 0 for
    padding) and `positions` (restarting at 0 for each piece), plus host-side `stats`:
    cumulative counts of skipped records by reason, tokens placed per source, and padding.

    Parent elements are `{'tokens', 'loss_mask'[, 'source']}` or `{'skip': reason index}`.
    """

    def __init__(self, parent, seq_len: int, *, mode: str = "concat", num_sources: int = 1):
        super().__init__(parent)
        if mode not in PACKING_MODES:
            raise ValueError(f"packing mode {mode!r}; expected one of {PACKING_MODES}")
        self._seq_len, self._mode, self._num_sources = seq_len, mode, num_sources

    def __iter__(self) -> _PackedRowsIterator:
        return _PackedRowsIterator(
            self._parent.__iter__(), self._seq_len, self._mode, self._num_sources
        )

    def __str__(self) -> str:
        return f"PackedRows(seq_len={self._seq_len}, mode={self._mode})"


class _PackedRowsIterator(grain.DatasetIterator):
    def __init__(self, parent, seq_len: int, mode: str, num_sources: int):
        super().__init__(parent)
        self._seq_len, self._mode = seq_len, mode
        self._doc: dict[str, np.ndarray] | None = None
        self._doc_state = None  # the parent's state just before `_doc` was read
        self._offset = 0
        self._skipped = [0] * len(SKIP_REASONS)
        self._source_tokens = [0] * num_sources
        self._padding = 0

    def _next_doc(self, count: bool = True) -> None:
        while True:
            state = self._parent.get_state()
            element = next(self._parent)
            if "skip" not in element:
                break
            if count:
                self._skipped[int(element["skip"])] += 1
        self._doc_state, self._doc, self._offset = state, element, 0

    def __next__(self) -> dict:
        return self.next_row(self._seq_len)

    def next_row(self, n: int) -> dict:
        """The next row, of `n` tokens (the progressive sequence length changes it)."""
        row = {k: np.zeros(n, np.int32) for k in ("tokens", "loss_mask", "segment_ids")}
        row["positions"] = np.zeros(n, np.int32)
        filled, segment = 0, 0
        while filled < n:
            if self._doc is None or self._offset >= len(self._doc["tokens"]):
                self._next_doc()
            left = len(self._doc["tokens"]) - self._offset
            if left == 0:
                continue  # an empty document
            if self._mode == "whole" and filled and self._offset == 0 and left > n - filled:
                break  # starts the next row whole; the rest of this one is padding
            take = min(n - filled, left)
            piece = slice(self._offset, self._offset + take)
            where = slice(filled, filled + take)
            segment += 1
            row["tokens"][where] = self._doc["tokens"][piece]
            row["loss_mask"][where] = self._doc["loss_mask"][piece]
            row["segment_ids"][where] = segment
            row["positions"][where] = np.arange(take)
            filled += take
            self._offset += take
            self._source_tokens[int(self._doc.get("source", 0))] += take
        self._padding += n - filled
        row["stats"] = self._counters()
        return row

    def _counters(self) -> dict:
        return {
            "skipped": np.asarray(self._skipped, np.int64),
            "source_tokens": np.asarray(self._source_tokens, np.int64),
            "padding": np.int64(self._padding),
        }

    def get_state(self) -> dict:
        counters = {
            "skipped": list(self._skipped),
            "source_tokens": list(self._source_tokens),
            "padding": self._padding,
        }
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0, "started": False, **counters}
        return {"parent": self._doc_state, "offset": self._offset, "started": True, **counters}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["started"]:
            self._next_doc(count=False)
            self._offset = state["offset"]
        self._skipped = list(state.get("skipped", self._skipped))
        self._source_tokens = list(state.get("source_tokens", self._source_tokens))
        self._padding = state.get("padding", 0)
