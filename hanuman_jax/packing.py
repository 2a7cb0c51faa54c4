"""Concatenate-then-split packing of token documents into fixed-length rows, exactly resumable.

Grain's own ConcatThenSplitIterDataset (0.2.18) restores the wrong position when a checkpoint
falls exactly on a document boundary, so resumed runs would see different data; this iterator's
state is simply (parent state before the current document, offset into it).
"""

from __future__ import annotations

import grain
import numpy as np


class PackedRows(grain.IterDataset):
    """Rows of `seq_len` tokens: documents laid end to end, a long one continued in the next row.

    Each row holds `tokens`, `loss_mask`, `segment_ids` (1, 2, ... per document piece; 0 pads
    nothing here since rows are always full) and `positions` (restarting at 0 for each piece:
    attention never crosses rows and RoPE is relative, so a continued piece loses nothing).
    """

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> _PackedRowsIterator:
        return _PackedRowsIterator(self._parent.__iter__(), self._seq_len)

    def __str__(self) -> str:
        return f"PackedRows(seq_len={self._seq_len})"


class _PackedRowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._doc: dict[str, np.ndarray] | None = None
        self._doc_state = None  # the parent's state just before `_doc` was read
        self._offset = 0

    def _next_doc(self) -> None:
        self._doc_state = self._parent.get_state()
        self._doc = next(self._parent)
        self._offset = 0

    def __next__(self) -> dict[str, np.ndarray]:
        n = self._seq_len
        row = {k: np.zeros(n, np.int32) for k in ("tokens", "loss_mask", "segment_ids")}
        row["positions"] = np.zeros(n, np.int32)
        filled, segment = 0, 0
        while filled < n:
            if self._doc is None or self._offset >= len(self._doc["tokens"]):
                self._next_doc()
            take = min(n - filled, len(self._doc["tokens"]) - self._offset)
            if take == 0:
                continue  # an empty document
            piece = slice(self._offset, self._offset + take)
            where = slice(filled, filled + take)
            segment += 1
            row["tokens"][where] = self._doc["tokens"][piece]
            row["loss_mask"][where] = self._doc["loss_mask"][piece]
            row["segment_ids"][where] = segment
            row["positions"][where] = np.arange(take)
            filled += take
            self._offset += take
        return row

    def get_state(self) -> dict:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0, "started": False}
        return {"parent": self._doc_state, "offset": self._offset, "started": True}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["started"]:
            self._next_doc()
            self._offset = state["offset"]
