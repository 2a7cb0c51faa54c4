"""The data, optimizer and train sections, each a frozen dataclass that checks its own fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hanuman_jax.config.fields import (
    FLAG,
    INT32_MAX,
    Int,
    OneOf,
    Section,
    Text,
    above,
    at_least,
    check,
    within,
)

# modules, not their names: data/ imports hanuman_jax.config.fields, which runs this package, so
# either side may be imported first
from hanuman_jax.data import schedule as data_schedule
from hanuman_jax.data import sources as data_sources

PACKING_MODES = ("concat", "whole")
MAX_LOSS_SCALE = 2.0**24  # float16's dynamic loss scale never grows past this


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """What is read, how it is tokenized and how rows are packed."""

    PREFIX = "data"
    RULES = {
        "tokenizer": Text("path to a SentencePiece .model"),
        "seq_len": Int(2),
        "packing": OneOf(PACKING_MODES),
        "strict": FLAG,
    }

    sources: Sequence[dict]
    tokenizer: str
    seq_len: int
    seq_len_schedule: Sequence[tuple[float, int]]
    eval_sources: Sequence[dict]
    packing: str
    strict: bool

    def check_fields(self) -> None:
        check(
            isinstance(self.sources, (list, tuple)) and len(self.sources) > 0,
            "data.sources",
            self.sources,
            "must be a non-empty list of {'path': ..., 'weight': ...}",
        )
        data_sources.check_sources(self.sources, "data.sources")
        check(
            isinstance(self.eval_sources, (list, tuple)),
            "data.eval_sources",
            self.eval_sources,
            "must be a list of sources like data.sources (may be empty)",
        )
        data_sources.check_sources(self.eval_sources, "data.eval_sources")
        data_schedule.check_seq_len_schedule(self.seq_len_schedule, self.seq_len)

    def row_lengths(self) -> list[int]:
        """Every row length training uses: data.seq_len and each schedule phase's."""
        return [self.seq_len, *(length for _, length in self.seq_len_schedule)]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Section):
    """AdamW, its learning-rate schedule, clipping and float16's loss scale."""

    PREFIX = "optimizer"
    RULES = {
        "peak_lr": above(0),
        "min_lr_ratio": within(0, 1),
        "warmup_fraction": within(0, 1, hi_open=True),
        "b1": within(0, 1, hi_open=True),
        "b2": within(0, 1, hi_open=True),
        "eps": above(0),
        "weight_decay": at_least(0),
        "grad_clip": at_least(0, "0 = no clipping"),
        "loss_scale": within(1, MAX_LOSS_SCALE, note="the float16 loss scale to start from"),
        "loss_scale_period": Int(1),
    }

    peak_lr: float
    min_lr_ratio: float
    warmup_fraction: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    grad_clip: float
    loss_scale: float
    loss_scale_period: int


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """The run: steps, batch, seed, and how often to log, save, evaluate, sample and profile."""

    PREFIX = "train"
    RULES = {
        "steps": Int(1, "the optimizer counts steps in int32", hi=INT32_MAX),
        **{k: Int(1) for k in ("batch_size", "grad_accum_steps", "log_every")},
        **{k: Int(1) for k in ("checkpoint_every", "keep_checkpoints", "eval_batches")},
        **{k: Int(1) for k in ("sample_tokens", "max_nonfinite_steps")},
        "seed": Int(None),
        "eval_every": Int(0, "0 = no periodic evaluation"),
        "sample_every": Int(0, "0 = no sample generations"),
        "profile_steps": Int(0, "0 = no profile"),
        "sample_chat": FLAG,
        "init_from": Text(
            "must be a path to another run's workdir or checkpoints/ (or '' for none)",
            empty_ok=True,
        ),
        "compilation_cache": Text(
            "must be a folder (relative: inside the workdir), or '' for none", empty_ok=True
        ),
        "allow_lr_jump": FLAG,
    }

    steps: int
    batch_size: int
    grad_accum_steps: int
    seed: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    eval_every: int
    eval_batches: int
    sample_every: int
    sample_prompts: Sequence[str]
    sample_tokens: int
    sample_chat: bool
    profile_steps: int
    max_nonfinite_steps: int
    init_from: str
    compilation_cache: str = "compilation_cache"  # older configs lack it
    allow_lr_jump: bool = False  # older configs lack it

    def check_fields(self) -> None:
        prompts = self.sample_prompts
        check(
            isinstance(prompts, (list, tuple))
            and all(isinstance(p, str) and p.strip() for p in prompts),
            "train.sample_prompts",
            prompts,
            "must be a list of non-empty strings",
        )
        check(
            self.sample_every == 0 or len(prompts) > 0,
            "train.sample_every",
            self.sample_every,
            "needs train.sample_prompts to generate from",
        )
