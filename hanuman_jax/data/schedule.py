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

from hanuman_jax.config.fields import check

_KEY, _SHAPE = "data.seq_len_schedule", "a list of (fraction of train.steps, seq_len) pairs"


def phase_start(fraction: float, steps: int) -> int:
    """The first step of a `data.seq_len_schedule` phase that starts at `fraction` of `steps`."""
    # round first: 0.29 x 100 is 28.999999999999996 in floating point, and starts at 29
    return int(round(fraction * steps, 6))


def check_seq_len_schedule(schedule, seq_len: int) -> None:
    """`data.seq_len_schedule`: [(fraction of train.steps, length), ...] growing to seq_len."""
    check(isinstance(schedule, (list, tuple)), _KEY, schedule, f"must be {_SHAPE}, or []")
    if not schedule:
        return
    for i, pair in enumerate(schedule):
        check(
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and isinstance(pair[0], (int, float))
            and isinstance(pair[1], int),
            f"{_KEY}[{i}]",
            pair,
            "must be a (fraction, seq_len) pair like (0.5, 4096)",
        )
        fraction, length = pair
        check(0 <= fraction < 1, f"{_KEY}[{i}]", pair, "its fraction must be in [0, 1)")
        check(
            length >= 2 and seq_len % length == 0,
            f"{_KEY}[{i}]",
            pair,
            f"its seq_len must divide data.seq_len ({seq_len}), so that every batch keeps "
            "train.batch_size x data.seq_len tokens",
        )
        if i:
            before = schedule[i - 1]
            check(
                fraction > before[0] and length > before[1],
                f"{_KEY}[{i}]",
                pair,
                f"fractions and lengths must both grow (after {tuple(before)})",
            )
    check(schedule[0][0] == 0, f"{_KEY}[0]", schedule[0], "the first phase must start at 0.0")
    check(
        schedule[-1][1] == seq_len,
        _KEY,
        schedule,
        f"the last phase's seq_len must be data.seq_len ({seq_len}), the length it grows to",
    )


def check_phase_starts(schedule, steps: int) -> None:
    """Every phase of a checked schedule gets at least one of `train.steps`."""
    for i in range(1, len(schedule)):
        start, before = (phase_start(schedule[j][0], steps) for j in (i, i - 1))
        check(
            start > before,
            f"{_KEY}[{i}]",
            schedule[i],
            f"starts at step {start} of train.steps={steps}, as the phase before it does: "
            "that phase would get no step",
        )


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
