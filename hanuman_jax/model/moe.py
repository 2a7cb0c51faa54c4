"""Mixture-of-Experts feed-forward: top-k router, and dropless or capacity dispatch.

Each token is computed only by its selected experts.
- `dropless`: each (token, expert) assignment is a row, and the SwiGLU experts run as grouped
  matmuls over those rows (grouped.py); no assignment is ever dropped.
- `capacity`: each expert takes at most capacity_factor x tokens x top_k / num_experts
  assignments into a fixed [experts, capacity] buffer (first choices before second choices,
  then in token order); an assignment over capacity is dropped (the token keeps its residual and
  its other experts) and counted.
With a mesh whose `expert` axis is > 1 in context, each device holds its share of the experts and
the tokens travel to them and back (moe_parallel.py).
"""

from __future__ import annotations

import functools
import math
import typing

import jax
import jax.numpy as jnp
from flax import nnx

from hanuman_jax.model import moe_parallel
from hanuman_jax.model.grouped import grouped_swiglu
from hanuman_jax.model.layers import group_ranks, param

if typing.TYPE_CHECKING:
    from hanuman_jax.config import ModelConfig, MoeConfig

Array = jax.Array
# the experts behind a dispatch: local, or across devices (moe_parallel.py)
ExpertsFn = typing.Callable[..., Array]


class Routing(typing.NamedTuple):
    experts_TA: Array  # int32 expert index of each of a token's k choices
    weights_TA: Array  # fp32, renormalised over the k choices
    aux: dict[str, Array]


def route(
    logits_TE: Array,
    valid_T: Array,
    *,
    top_k: int,
    temperature: float,
) -> Routing:
    """softmax(logits / temperature), top-k, renormalised weights, load-balance and z losses."""
    num_experts = logits_TE.shape[-1]
    scaled_TE = logits_TE.astype(jnp.float32) / temperature
    probs_TE = jax.nn.softmax(scaled_TE, axis=-1)
    top_w_TA, top_e_TA = jax.lax.top_k(probs_TE, top_k)
    weights_TA = top_w_TA / jnp.sum(top_w_TA, axis=-1, keepdims=True)

    valid = valid_T.astype(jnp.float32)
    n_valid = jnp.maximum(jnp.sum(valid), 1.0)
    chosen_TE = jnp.sum(jax.nn.one_hot(top_e_TA, num_experts, dtype=jnp.float32), axis=1)
    load_E = jnp.sum(chosen_TE * valid[:, None], axis=0) / (n_valid * top_k)
    importance_E = jnp.sum(probs_TE * valid[:, None], axis=0) / n_valid
    # Switch Transformer: E * sum_e f_e * P_e, which is 1.0 under perfect balance.
    balance = num_experts * jnp.sum(load_E * importance_E)
    z = jnp.sum(jnp.square(jax.nn.logsumexp(scaled_TE, axis=-1)) * valid) / n_valid
    entropy_T = -jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-30)), axis=-1)
    aux = {
        "aux_loss": balance,
        "z_loss": z,
        # per-layer statistics (logged, not trained on): shares of the routed assignments
        "load_max": jnp.max(load_E),
        "load_min": jnp.min(load_E),
        "router_entropy": jnp.sum(entropy_T * valid) / n_valid,
    }
    return Routing(top_e_TA.astype(jnp.int32), weights_TA, aux)


def _batched_swiglu(x_ECD: Array, w_gate_EDF: Array, w_up_EDF: Array, w_down_EFD: Array) -> Array:
    """SwiGLU of each group of rows with its own weights: x[n] through expert weights [n]."""
    gate_ECF = jnp.einsum("ECD,EDF->ECF", x_ECD, w_gate_EDF)
    up_ECF = jnp.einsum("ECD,EDF->ECF", x_ECD, w_up_EDF)
    return jnp.einsum("ECF,EFD->ECD", jax.nn.silu(gate_ECF) * up_ECF, w_down_EFD)


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Slots per expert: ceil(factor x tokens x top_k / experts), at least 1."""
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def capacity_slots(
    experts_TA: Array, valid_T: Array, num_experts: int, c: int
) -> tuple[Array, Array]:
    """Each assignment's slot in a [experts x c] buffer (k-major: every first choice before any
    second, then token order), or experts x c where it is dropped; and whether it is kept."""
    k = experts_TA.shape[1]
    expert_R = experts_TA.T.reshape(-1)
    valid_R = jnp.tile(valid_T, k)
    rank_R = group_ranks(expert_R, num_experts, counted_R=valid_R)
    keep_R = valid_R & (rank_R < c)
    return jnp.where(keep_R, expert_R * c + rank_R, num_experts * c), keep_R


def capacity_dispatch(
    x_TD: Array,
    routing: Routing,
    valid_T: Array,
    experts_fn: ExpertsFn,
    *,
    num_experts: int,
    capacity_factor: float,
) -> tuple[Array, Array]:
    """Capacity dispatch around `experts_fn(x_ECD) -> y_ECD`: the combined output and the number
    of valid assignments dropped."""
    t, d = x_TD.shape
    k = routing.experts_TA.shape[1]
    e = num_experts
    c = capacity(t, k, e, capacity_factor)
    slot_R, keep_R = capacity_slots(routing.experts_TA, valid_T, e, c)
    x_RD = jnp.tile(x_TD, (k, 1))  # k-major copies: the backward is a sum, not a scatter-add
    x_ECD = jnp.zeros((e * c, d), x_TD.dtype).at[slot_R].set(x_RD, mode="drop")
    y_ECD = experts_fn(x_ECD.reshape(e, c, d))
    y_RD = y_ECD.reshape(e * c, d).at[slot_R].get(mode="fill", fill_value=0)
    weights_AT = routing.weights_TA.T.astype(x_TD.dtype) * keep_R.reshape(k, t).astype(x_TD.dtype)
    y_TD = jnp.einsum("ATD,AT->TD", y_RD.reshape(k, t, d), weights_AT)
    return y_TD, jnp.sum(jnp.tile(valid_T, k) & ~keep_R)


def dropless_dispatch(x_TD: Array, routing: Routing, experts_fn: ExpertsFn) -> Array:
    """Dropless dispatch around `experts_fn(x_RD, expert_R) -> y_RD` (row r through expert
    expert_R[r]), over every token's k assignments."""
    t, d = x_TD.shape
    k = routing.experts_TA.shape[1]
    # every token k times (backward: a sum); each copy goes to its own place, so no scatter-add
    # with repeated indices anywhere and the result is deterministic on every backend
    y_TAD = experts_fn(jnp.repeat(x_TD, k, axis=0), routing.experts_TA.reshape(-1))
    return jnp.einsum("TAD,TA->TD", y_TAD.reshape(t, k, d), routing.weights_TA.astype(x_TD.dtype))


class MoEFeedForward(nnx.Module):
    """Top-k routed SwiGLU experts (no shared expert), dropless or with capacity."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, e = cfg.d_model, cfg.ffn_hidden, cfg.moe.num_experts
        pdt = jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.router = param(rngs, (d, e), ("embed", None), cfg.init_std, pdt)
        self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg.init_std, pdt)
        self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg.init_std, pdt)
        self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), out_std, pdt)
        self.moe = cfg.moe
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(
        self, x_BTD: Array, *, valid_BT: Array, rng: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        b, t, d = x_BTD.shape
        m = self.moe
        x_TD = x_BTD.reshape(b * t, d)
        router_in_TD = x_TD.astype(jnp.float32)
        if rng is not None and m.jitter > 0:
            router_in_TD = router_in_TD * jax.random.uniform(
                rng, router_in_TD.shape, minval=1.0 - m.jitter, maxval=1.0 + m.jitter
            )
        logits_TE = router_in_TD @ self.router[...].astype(jnp.float32)
        # Routing and its statistics stay outside any shard_map: they are per token, and XLA
        # partitions them over the batch, so the losses are the global ones on every mesh.
        routing = route(
            logits_TE, valid_BT.reshape(-1), top_k=m.top_k, temperature=m.router_temperature
        )
        dt = self.dtype
        weights = tuple(w[...].astype(dt) for w in (self.w_gate, self.w_up, self.w_down))
        mesh = moe_parallel.expert_parallel_mesh()
        if mesh is not None:
            y_BTD, dropped = _expert_parallel(x_BTD.astype(dt), routing, valid_BT, weights, m, mesh)
            return y_BTD, routing.aux | {"dropped": dropped}
        valid_T = valid_BT.reshape(-1)
        y_TD, n_dropped = dispatch(x_TD.astype(dt), routing, valid_T, weights, m)
        dropped = n_dropped / jnp.maximum(jnp.sum(valid_T) * m.top_k, 1)
        return y_TD.reshape(b, t, d), routing.aux | {"dropped": dropped}


def dispatch(
    x_TD: Array,
    routing: Routing,
    valid_T: Array,
    weights: tuple[Array, ...],
    m: MoeConfig,
    *,
    across_devices: bool = False,
) -> tuple[Array, Array]:
    """The combined expert output and the number of valid assignments dropped. With
    `across_devices` (inside shard_map) `weights` hold this device's experts, and the tokens
    travel to the devices of theirs."""
    k = m.top_k
    if m.dispatch == "capacity":
        experts_fn = functools.partial(_batched_swiglu, w_gate_EDF=weights[0],
                                       w_up_EDF=weights[1], w_down_EFD=weights[2])  # fmt: skip
        if across_devices:
            experts_fn = functools.partial(moe_parallel.exchange_slots, experts_fn=experts_fn)
        return capacity_dispatch(x_TD, routing, valid_T, experts_fn, num_experts=m.num_experts,
                                 capacity_factor=m.capacity_factor)  # fmt: skip
    experts_fn = functools.partial(
        grouped_swiglu, w_gate_EDF=weights[0], w_up_EDF=weights[1], w_down_EFD=weights[2],
        impl=m.grouped_matmul, block_size=m.block_size,
    )  # fmt: skip
    if across_devices:
        slots = moe_parallel.dropless_slots(x_TD.shape[0], k, m.num_experts)
        experts_fn = functools.partial(moe_parallel.exchange_rows, experts_fn=experts_fn,
                                       num_experts=m.num_experts, slots=slots)  # fmt: skip
    y_TD = dropless_dispatch(x_TD, routing, experts_fn)
    return y_TD, jnp.zeros((), jnp.int32)


def _expert_parallel(
    x_BTD: Array,
    routing: Routing,
    valid_BT: Array,
    weights: tuple[Array, ...],
    m: MoeConfig,
    mesh: jax.sharding.AbstractMesh,
) -> tuple[Array, Array]:
    """`dispatch` in shard_map: each device sends its own rows of the batch to their experts."""
    b, t, d = x_BTD.shape
    k = m.top_k

    def local(x_BTD, experts_BTA, weights_BTA, valid_BT, *weights):
        rows = x_BTD.shape[0] * t
        routing = Routing(experts_BTA.reshape(rows, k), weights_BTA.reshape(rows, k), {})
        valid_T = valid_BT.reshape(rows)
        y_TD, n_dropped = dispatch(x_BTD.reshape(rows, d), routing, valid_T, weights, m,
                                   across_devices=True)  # fmt: skip
        n_assigned = moe_parallel.batch_sum(jnp.sum(valid_T)) * k
        dropped = moe_parallel.batch_sum(n_dropped) / jnp.maximum(n_assigned, 1)
        return y_TD.reshape(-1, t, d), dropped

    return moe_parallel.shard_over_experts(local, mesh)(
        x_BTD,
        routing.experts_TA.reshape(b, t, k),
        routing.weights_TA.reshape(b, t, k),
        valid_BT,
        *weights,
    )
