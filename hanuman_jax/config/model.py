"""The model section: the architecture `model.Transformer` is built from, frozen and checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from hanuman_jax.config.fields import (
    FINITE,
    FLAG,
    INT32_MAX,
    Int,
    OneOf,
    Section,
    above,
    at_least,
    check,
    section_keys,
)

DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
ROPE_SCALINGS = ("none", "linear", "llama3")
REMAT_MODES = ("none", "full", "save_matmuls")  # what a block keeps for the backward pass
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
GROUPED_MATMULS = ("auto", "blocked", "ragged_dot", "gmm")
DISPATCHES = ("dropless", "capacity")


@dataclasses.dataclass(frozen=True)
class RopeConfig(Section):
    """Rotary position embedding: base frequency and context-extension scaling."""

    PREFIX = "model.rope"
    RULES = {
        "theta": above(0),
        "scaling": OneOf(ROPE_SCALINGS),
        "factor": FINITE,
        "original_context": Int(1),
        "low_freq_factor": FINITE,
        "high_freq_factor": FINITE,
    }

    theta: float = 10_000.0
    scaling: str = "none"
    factor: float = 1.0
    original_context: int = 4096
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def check_fields(self) -> None:
        if self.scaling != "none":
            check(
                self.factor >= 1,
                "model.rope.factor",
                self.factor,
                "must be >= 1 when scaling is on",
            )
        if self.scaling == "llama3":
            check(
                0 < self.low_freq_factor < self.high_freq_factor,
                "model.rope.low_freq_factor",
                self.low_freq_factor,
                f"must be in (0, model.rope.high_freq_factor={self.high_freq_factor})",
            )


@dataclasses.dataclass(frozen=True)
class MoeConfig(Section):
    """Mixture of experts: routing, its auxiliary losses and the expert kernel (0: dense)."""

    PREFIX = "model.moe"
    RULES = {
        "num_experts": Int(0, "0 means a dense model"),
        "top_k": Int(1),
        "router_temperature": above(0),
        "aux_loss_coef": at_least(0),
        "z_loss_coef": at_least(0),
        "jitter": at_least(0),
        "grouped_matmul": OneOf(GROUPED_MATMULS),
        "block_size": Int(8),
        "dispatch": OneOf(DISPATCHES),
        "capacity_factor": above(0, "slots per expert = factor x tokens x top_k / experts"),
    }

    num_experts: int = 0
    top_k: int = 2
    router_temperature: float = 1.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    jitter: float = 0.0
    grouped_matmul: str = "auto"  # resolved per platform (model/grouped.py grouped_kernel)
    block_size: int = 1024
    dispatch: str = "dropless"
    capacity_factor: float = 1.25

    def check_fields(self) -> None:
        experts = self.num_experts
        if experts:
            check(experts >= 2, "model.moe.num_experts", experts, "must be 0 (dense) or >= 2")
            valid = f"must be between 1 and model.moe.num_experts ({experts})"
            check(self.top_k <= experts, "model.moe.top_k", self.top_k, valid)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """The architecture, frozen: what `model.Transformer` is built from."""

    PREFIX = "model"
    RULES = {
        "vocab_size": Int(0, "0 = the tokenizer's piece count; token ids are int32", hi=INT32_MAX),
        **{k: Int(1) for k in ("num_layers", "d_model", "num_heads", "num_kv_heads")},
        **{k: Int(1) for k in ("ffn_hidden", "max_seq_len")},
        "head_dim": Int(0, "0 means d_model / num_heads"),
        "tie_embeddings": FLAG,
        "norm_eps": above(0),
        "init_std": above(0),
        "dtype": OneOf(DTYPES),
        "param_dtype": OneOf(PARAM_DTYPES),
        "remat": OneOf(REMAT_MODES),
        "attention": OneOf(ATTENTION_IMPLS),
        "attention_block": Int(0, "0 means the whole sequence at once"),
    }

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden: int
    max_seq_len: int
    head_dim: int = 0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    attention_block: int = 0
    rope: RopeConfig = RopeConfig()
    moe: MoeConfig = MoeConfig()

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def check_fields(self) -> None:
        check(
            self.num_heads % self.num_kv_heads == 0,
            "model.num_kv_heads",
            self.num_kv_heads,
            f"must divide model.num_heads ({self.num_heads})",
        )
        if self.head_dim == 0:
            check(
                self.d_model % self.num_heads == 0,
                "model.num_heads",
                self.num_heads,
                f"must divide model.d_model ({self.d_model}) when model.head_dim is 0",
            )
        check(self.hd % 2 == 0, "model.head_dim", self.hd, "must be even for RoPE")

    def check_row_length(self, length: int) -> None:
        """Checks that the attention can train rows of `length` tokens (any of data.row_lengths)."""
        check(
            self.attention != "cudnn" or length % 2 == 0,
            "model.attention",
            self.attention,
            f"cuDNN trains a masked attention on even row lengths only (data.seq_len / "
            f"seq_len_schedule: {length}); use auto or xla",
        )
        block = self.attention_block
        check(
            block == 0 or length <= block or length % block == 0,
            "model.attention_block",
            block,
            f"must divide each row length longer than it (data.seq_len / seq_len_schedule: "
            f"{length}), or the whole {length} x {length} scores would be made at once",
        )

    @classmethod
    def from_config(cls, node: ml_collections.ConfigDict | Mapping[str, Any]) -> ModelConfig:
        """The model built (and so checked) from `cfg.model`, its rope and moe keys included."""
        raw = section_keys(cls, node)
        rope = RopeConfig.from_config(raw.pop("rope", {}))
        moe = MoeConfig.from_config(raw.pop("moe", {}))
        return cls(**raw, rope=rope, moe=moe)
