"""The one place a `Transformer` is built from a `ModelConfig`: abstractly (shapes only, cached),
around a pure parameter dict, or initialised; and the config it runs with outside training."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx

from hanuman_jax.config import ModelConfig
from hanuman_jax.model.attention import Kernel
from hanuman_jax.model.grouped import grouped_kernel
from hanuman_jax.model.transformer import Transformer

if TYPE_CHECKING:  # the planner resolves targets; the model only reads one
    from hanuman_jax.planning.targets import Target


def abstract_model(
    cfg: ModelConfig, kernel: Kernel | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its Params as shapes and dtypes (nothing allocated, built once)."""
    return _abstract_model(cfg, kernel)


@functools.lru_cache(maxsize=32)
def _abstract_model(cfg: ModelConfig, kernel: Kernel | None) -> tuple[nnx.GraphDef, nnx.State]:
    # outside any mesh in context (a traced train step's): the template carries no sharding
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        abstract = nnx.eval_shape(lambda: Transformer(cfg, kernel=kernel, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)


def abstract_params(cfg: ModelConfig) -> dict:
    """The pure parameter dict's shapes and dtypes. They do not depend on the attention kernel,
    so a run trained with `model.attention=cudnn` loads where cuDNN is absent (a CPU, a T4)."""
    return nnx.to_pure_dict(abstract_model(cfg)[1])


def model_from_params(cfg: ModelConfig, params: dict, kernel: Kernel | None = None) -> Transformer:
    """The model holding `params` (a pure dict, traced or concrete), running `kernel`."""
    graphdef, template = abstract_model(cfg, kernel)
    state = jax.tree.map(lambda v: v, template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Freshly initialised parameters as a pure dict (jit it with out_shardings to create them
    sharded)."""
    model = Transformer(cfg, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def inference_config(cfg: ModelConfig, target: Target) -> ModelConfig:
    """The model as it runs outside training on `target`: dropless MoE (capacity drops
    assignments only in training), no router noise, no rematerialisation, kernels `target` has
    (cudnn and splash become auto: the fused kernel where it runs, XLA's attention elsewhere)."""
    # an expert kernel `target` lacks (ragged_dot or gmm trained elsewhere) gives way to auto's
    impl = grouped_kernel(cfg.moe.grouped_matmul, cfg.dtype, target.platform, strict=False)
    moe = dataclasses.replace(cfg.moe, dispatch="dropless", jitter=0.0, grouped_matmul=impl)
    attention = "auto" if cfg.attention in ("cudnn", "splash") else cfg.attention
    return dataclasses.replace(cfg, moe=moe, remat="none", attention=attention)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Total and active (per-token) parameter counts from the abstract model (nothing allocated)."""
    flat = nnx.to_flat_state(abstract_model(cfg)[1])
    total = expert = 0
    for path, var in flat:
        size = int(np.prod(var.value.shape))
        total += size
        if "moe" in path and path[-1] in ("w_gate", "w_up", "w_down"):
            expert += size
    e = cfg.moe
    inactive = expert * (e.num_experts - e.top_k) // e.num_experts if e.num_experts else 0
    return {"total": total, "active": total - inactive, "embedding": cfg.vocab_size * cfg.d_model}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token as PaLM counts them: 6 x active matmul params + attention."""
    counts = count_params(cfg)
    matmul = counts["active"] - counts["embedding"]  # the lookup is free ...
    if cfg.tie_embeddings:
        matmul += counts["embedding"]  # ... but the tied LM head is a matmul
    norms = (2 * cfg.num_layers + 1) * cfg.d_model
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.hd * seq_len
    return 6.0 * (matmul - norms) + attention
