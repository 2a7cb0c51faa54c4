"""Grouped SwiGLU: each row through the SwiGLU of its own expert, for dropless MoE dispatch.

Two kernels (`model.moe.grouped_matmul`):
- `blocked`: rows are laid out from block boundaries, expert by expert, and a loop runs one block
  at a time through its expert's weights, read in place. The loop stops after the blocks in use,
  so padding costs less than one block per expert and nothing else. The backward is written out
  (`jax.custom_vjp`): JAX cannot differentiate a loop whose trip count depends on the data, and
  the hand-written one accumulates each expert's weight gradient in float32 in place.
- `ragged_dot`: `jax.lax.ragged_dot` on rows sorted by expert (GPU and TPU only: XLA:CPU lowers it
  to a dense product over every expert).

An expert index equal to the number of experts marks a row that has no expert (an empty slot of
an expert-parallel exchange buffer): it is not computed and its output is zero.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hanuman_jax.model.layers import group_ranks

Array = jax.Array


def block_rows(num_rows: int, num_experts: int, block_size: int) -> int:
    """Rows per block: about rows / (4 x experts), a power of two from 8 up to `block_size`.

    Larger blocks run the matmuls faster; smaller ones pad less (at most one block per expert,
    so at most a quarter of the rows here). The rule is the best of a sweep of block sizes
    against a dense SwiGLU of the same FLOPs (BENCHMARKS.md, `scripts/bench_grouped_matmul.py`)."""
    target = max(1, num_rows // (4 * num_experts))
    return int(min(block_size, max(8, 1 << int(math.log2(target)))))


def _layout(expert_R: Array, num_experts: int, block: int):
    """Where each row goes when every expert's rows start at a block boundary, in row order.

    Returns each row's position (past the end for a row with no expert), each block's expert,
    the number of blocks in use (traced) and the buffer's blocks (static: the worst case)."""
    num_rows = expert_R.shape[0]
    num_blocks = (num_rows + num_experts * (block - 1)) // block
    has_expert_R = expert_R < num_experts
    rank_R = group_ranks(expert_R, num_experts, counted_R=has_expert_R)
    padded_E = (jnp.bincount(expert_R, length=num_experts) + block - 1) // block * block
    end_E = jnp.cumsum(padded_E)
    start_R = jnp.take(end_E - padded_E, expert_R, mode="fill", fill_value=num_blocks * block)
    dest_R = jnp.where(has_expert_R, start_R + rank_R, num_blocks * block)
    block_expert_M = jnp.searchsorted(end_E, jnp.arange(num_blocks) * block, side="right")
    used = end_E[-1] // block
    return dest_R, jnp.minimum(block_expert_M, num_experts - 1), used, num_blocks


def _varies_over(a: Array) -> frozenset:
    """The mesh axes `a` varies over inside shard_map (`vma` before jax 0.10)."""
    aval = jax.typeof(a)
    if hasattr(aval, "vma"):
        return frozenset(aval.vma)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def _vma(*arrays: Array) -> tuple[str, ...]:
    """The mesh axes that any of `arrays` varies over."""
    return tuple(sorted(frozenset().union(*map(_varies_over, arrays))))


def _varying(a: Array, axes: tuple[str, ...]) -> Array:
    """`a`, typed as varying over `axes` (a loop's carry must keep one type inside shard_map)."""
    missing = tuple(ax for ax in axes if ax not in _varies_over(a))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def _rows(a: Array, i, block: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(a, i * block, block)


def _put(a: Array, rows: Array, i, block: int) -> Array:
    return jax.lax.dynamic_update_slice_in_dim(a, rows, i * block, 0)


@functools.cache
def _blocked(block: int):
    @jax.custom_vjp
    def swiglu(x_RD, expert_R, w_gate_EDF, w_up_EDF, w_down_EFD):
        return _forward(x_RD, expert_R, w_gate_EDF, w_up_EDF, w_down_EFD)[0]

    def _forward(x_RD, expert_R, w_gate_EDF, w_up_EDF, w_down_EFD):
        d = x_RD.shape[1]
        num_experts, _, f = w_gate_EDF.shape
        dest_R, expert_M, used, num_blocks = _layout(expert_R, num_experts, block)
        x_PD = (
            jnp.zeros((num_blocks * block, d), x_RD.dtype)
            .at[dest_R]
            .set(x_RD, mode="drop", unique_indices=True)
        )

        def body(i, carry):
            y_PD, gate_PF, up_PF = carry
            e, x_CD = expert_M[i], _rows(x_PD, i, block)
            gate_CF, up_CF = x_CD @ w_gate_EDF[e], x_CD @ w_up_EDF[e]
            y_CD = (jax.nn.silu(gate_CF) * up_CF) @ w_down_EFD[e]
            return (
                _put(y_PD, y_CD, i, block),
                _put(gate_PF, gate_CF, i, block),
                _put(up_PF, up_CF, i, block),
            )

        zeros = lambda n: _varying(jnp.zeros((num_blocks * block, n), x_RD.dtype), _vma(x_RD))
        y_PD, gate_PF, up_PF = jax.lax.fori_loop(0, used, body, (zeros(d), zeros(f), zeros(f)))
        y_RD = y_PD.at[dest_R].get(mode="fill", fill_value=0, unique_indices=True)
        weights = (w_gate_EDF, w_up_EDF, w_down_EFD)
        return y_RD, (x_PD, gate_PF, up_PF, dest_R, expert_M, used, expert_R, weights)

    def _backward(residuals, dy_RD):
        x_PD, gate_PF, up_PF, dest_R, expert_M, used, expert_R, weights = residuals
        w_gate_EDF, w_up_EDF, w_down_EFD = weights
        dy_PD = jnp.zeros_like(x_PD).at[dest_R].set(dy_RD, mode="drop", unique_indices=True)
        f32 = jnp.float32

        def body(i, carry):
            dx_PD, dw_gate, dw_up, dw_down = carry
            e = expert_M[i]
            x_CD, dy_CD = _rows(x_PD, i, block), _rows(dy_PD, i, block)
            gate_CF, up_CF = _rows(gate_PF, i, block), _rows(up_PF, i, block)
            sig_CF = jax.nn.sigmoid(gate_CF)
            act_CF = gate_CF * sig_CF
            dh_CF = dy_CD @ w_down_EFD[e].T
            dgate_CF = dh_CF * up_CF * (sig_CF * (1 + gate_CF * (1 - sig_CF)))
            dup_CF = dh_CF * act_CF
            dx_CD = dgate_CF @ w_gate_EDF[e].T + dup_CF @ w_up_EDF[e].T

            def grad(a, b):  # a.T @ b, accumulated in float32
                return jnp.matmul(a.T, b, preferred_element_type=f32)

            return (
                _put(dx_PD, dx_CD, i, block),
                dw_gate.at[e].add(grad(x_CD, dgate_CF)),
                dw_up.at[e].add(grad(x_CD, dup_CF)),
                dw_down.at[e].add(grad(act_CF * up_CF, dy_CD)),
            )

        axes = _vma(x_PD)
        init = tuple(_varying(jnp.zeros(a.shape, t), axes) for a, t in
                     [(x_PD, x_PD.dtype), *((w, f32) for w in weights)])  # fmt: skip
        dx_PD, *dw = jax.lax.fori_loop(0, used, body, init)
        dx_RD = dx_PD.at[dest_R].get(mode="fill", fill_value=0, unique_indices=True)
        no_grad = np.zeros(expert_R.shape, jax.dtypes.float0)
        return (dx_RD, no_grad, *(g.astype(w.dtype) for g, w in zip(dw, weights, strict=True)))

    swiglu.defvjp(_forward, _backward)
    # jitted: called eagerly, the loop then compiles once per shape, not once per trip count
    return jax.jit(swiglu)


def _ragged(x_RD, expert_R, w_gate_EDF, w_up_EDF, w_down_EFD):
    num_experts = w_gate_EDF.shape[0]
    order_R = jnp.argsort(expert_R, stable=True)  # rows without an expert sort last
    sizes_E = jnp.bincount(expert_R, length=num_experts).astype(jnp.int32)
    x_sorted = x_RD.at[order_R].get(unique_indices=True)
    gate = jax.lax.ragged_dot(x_sorted, w_gate_EDF, sizes_E)
    up = jax.lax.ragged_dot(x_sorted, w_up_EDF, sizes_E)
    y_sorted = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down_EFD, sizes_E)
    y_sorted = jnp.where((jnp.arange(x_RD.shape[0]) < jnp.sum(sizes_E))[:, None], y_sorted, 0)
    return jnp.zeros_like(y_sorted).at[order_R].set(y_sorted, unique_indices=True)


def grouped_swiglu(
    x_RD: Array,
    expert_R: Array,
    w_gate_EDF: Array,
    w_up_EDF: Array,
    w_down_EFD: Array,
    *,
    impl: str,
    block_size: int,
) -> Array:
    """Row r through expert expert_R[r]'s SwiGLU (zero where expert_R[r] == experts); rows in any
    order, outputs in the same order."""
    if impl == "ragged_dot":
        return _ragged(x_RD, expert_R, w_gate_EDF, w_up_EDF, w_down_EFD)
    block = block_rows(x_RD.shape[0], w_gate_EDF.shape[0], block_size)
    # Inside shard_map every input must vary over the same axes: the hand-written backward then
    # returns weight gradients with the rows' axes, and this cast's transpose sums them over.
    inputs = (x_RD, expert_R, w_gate_EDF, w_up_EDF, w_down_EFD)
    axes = _vma(*inputs)
    return _blocked(block)(*(_varying(a, axes) for a in inputs))
