"""Expert parallelism: each device holds E / X experts, and tokens travel to them and back.

Used when the mesh in context splits the experts X > 1 ways: the jitted step is called (and so
traced) inside `jax.set_mesh(mesh)`. The MoE layer then runs in `jax.shard_map`: each device
dispatches its own share of the batch into a fixed-size buffer per destination device,
`jax.lax.all_to_all` over the expert axis delivers the buffers, the device's experts run on what
arrived, and a second all_to_all brings the results home. Fixed sizes, because
`ragged_all_to_all` does not run on XLA:CPU.

- capacity: moe.capacity_dispatch's [experts, capacity] buffer, with the capacity computed from
  the device's own tokens (ceil(factor x local tokens x top_k / experts) slots per expert and per
  device, ranked among that device's tokens), so what drops depends on the batch split.
- dropless: a token's top-k experts are distinct, so at most min(top_k, E / X) of its assignments
  go to one device. Local tokens x that many slots per destination can never overflow; the cost is
  a buffer up to X x min(top_k, E / X) / top_k times the rows actually routed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec

from hanuman_jax.model.layers import group_ranks
from hanuman_jax.sharding import LOGICAL_RULES, logical_to_spec

Array = jax.Array
EXPERT_AXIS = LOGICAL_RULES["expert"]
BATCH_AXES = LOGICAL_RULES["batch"]
HIDDEN_AXIS = LOGICAL_RULES["mlp"]


def expert_parallel_mesh() -> AbstractMesh | None:
    """The context mesh when it splits the experts over devices, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(EXPERT_AXIS, 1) == 1:
        return None
    return mesh


def shard_over_experts(local_fn: Callable, mesh: AbstractMesh) -> Callable:
    """`local_fn(x_BTD, experts_BTA, weights_BTA, valid_BT, w_gate, w_up, w_down)` on each device's
    rows of the batch, with its own experts' weights whole on `embed` (gathered over fsdp) and
    split on the hidden dim as the parameters are; returns (y_BTD, a replicated scalar)."""
    rows = logical_to_spec(("batch", None, None))
    w_in = logical_to_spec(("expert", None, "mlp"))
    w_out = logical_to_spec(("expert", "mlp", None))
    return jax.shard_map(
        local_fn,
        mesh=mesh,
        in_specs=(rows, rows, rows, logical_to_spec(("batch", None)), w_in, w_in, w_out),
        out_specs=(rows, PartitionSpec()),
    )


def batch_sum(x: Array) -> Array:
    """Sums a per-device count over every device that holds part of the batch."""
    return jax.lax.psum(x, BATCH_AXES)


def _sum_hidden(y: Array) -> Array:
    """Experts split on the hidden dim (tensor parallel) each return a partial sum."""
    return jax.lax.psum(y, HIDDEN_AXIS) if HIDDEN_AXIS else y


def _swap(a_X: Array) -> Array:
    """Block x of this device's array goes to device x; block x of the result came from device x."""
    return jax.lax.all_to_all(a_X, EXPERT_AXIS, 0, 0)


def exchange_slots(x_ECD: Array, *, experts_fn: Callable[[Array], Array]) -> Array:
    """Each expert's capacity slots to the device holding it and back: `experts_fn(x_LQD)` runs on
    this device's L experts over the slots of every source device."""
    e, c, d = x_ECD.shape
    x_count = jax.lax.axis_size(EXPERT_AXIS)
    local = e // x_count
    recv_XLCD = _swap(x_ECD.reshape(x_count, local, c, d))
    x_LQD = recv_XLCD.transpose(1, 0, 2, 3).reshape(local, x_count * c, d)
    y_LQD = _sum_hidden(experts_fn(x_LQD))
    y_XLCD = y_LQD.reshape(local, x_count, c, d).transpose(1, 0, 2, 3)
    return _swap(y_XLCD).reshape(e, c, d)


def dropless_slots(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Rows one device may send another: every token's assignments to that device's experts."""
    return num_tokens * min(top_k, num_experts // jax.lax.axis_size(EXPERT_AXIS))


def exchange_rows(
    x_RD: Array,
    expert_R: Array,
    *,
    experts_fn: Callable[[Array, Array], Array],
    num_experts: int,
    slots: int,
) -> Array:
    """Rows to the devices of their experts and back. A device runs `experts_fn(x_QD,
    local_expert_Q)` on what it receives from all; `slots` rows per destination must bound what
    one device sends to another (`dropless_slots`)."""
    r, d = x_RD.shape
    x_count = jax.lax.axis_size(EXPERT_AXIS)
    local = num_experts // x_count
    dest_R = expert_R // local
    slot_R = dest_R * slots + group_ranks(dest_R, x_count)
    # An empty slot names expert `local`, which is none: the experts skip it (grouped.py).
    send_XCD = jnp.zeros((x_count * slots, d), x_RD.dtype).at[slot_R].set(x_RD, unique_indices=True)
    send_XC = jnp.full((x_count * slots,), local, jnp.int32).at[slot_R].set(expert_R % local)
    recv_QD = _swap(send_XCD.reshape(x_count, slots, d)).reshape(x_count * slots, d)
    expert_Q = _swap(send_XC.reshape(x_count, slots)).reshape(x_count * slots)
    y_QD = _sum_hidden(experts_fn(recv_QD, expert_Q))
    y_XCD = _swap(y_QD.reshape(x_count, slots, d))
    return y_XCD.reshape(x_count * slots, d).at[slot_R].get(unique_indices=True)
