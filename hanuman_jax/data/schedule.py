"""Progressive sequence length (`data.seq_len_schedule`): shorter rows early in training, with
the tokens of every batch kept at `train.batch_size x data.seq_len`.

A phase of length L packs `data.seq_len / L` rows of L tokens where a full-length row would be,
so a batch has `train.batch_size x data.seq_len / L` rows. The phase of a batch is a function of
its index alone, so prefetching, resuming and any process count give the same batches. Positions
restart in every document piece as always, so RoPE (`model.rope`) is the one the model is built
and exported with, in every phase: nothing about the model changes between phases.
"""

from __future__ import annotations

import dataclasses

from hanuman_jax.config import phase_start


@dataclasses.dataclass(frozen=True)
class SeqLenSchedule:
    """Row length by step: `phases` are (first step, length) pairs, the first at step 0."""

    full: int  # data.seq_len: the last phase's length, and what one batch row's tokens add up to
    phases: tuple[tuple[int, int], ...]

    @classmethod
    def constant(cls, length: int) -> SeqLenSchedule:
        """Rows of `length` tokens throughout."""
        return cls(length, ((0, length),))

    @classmethod
    def from_config(cls, cfg) -> SeqLenSchedule:
        """The schedule of a validated config (constant at `data.seq_len` when it has none)."""
        full, steps = cfg.data.seq_len, cfg.train.steps
        if not cfg.data.seq_len_schedule:
            return cls.constant(full)
        pairs = [(float(f), int(n)) for f, n in cfg.data.seq_len_schedule]
        return cls(full, tuple((phase_start(f, steps), n) for f, n in pairs))

    def length(self, step: int) -> int:
        """Tokens per row at `step`."""
        return [n for first, n in self.phases if first <= step][-1]

    def rows_per_lane(self, step: int) -> int:
        """Rows of `length(step)` tokens that take the place of one `data.seq_len` row."""
        return self.full // self.length(step)

    def starts(self) -> list[int]:
        """The steps at which a new length begins (after the first)."""
        return [first for first, _ in self.phases[1:]]
