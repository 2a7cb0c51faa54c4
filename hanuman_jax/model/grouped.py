"""Grouped SwiGLU: each row through the SwiGLU of its own expert, for dropless MoE dispatch.

Three kernels (`model.moe.grouped_matmul`):
- `blocked`: rows are laid out from block boundaries, expert by expert, and a loop runs one block
  at a time through its expert's weights, read in place. The loop stops after the blocks in use,
  so padding costs less than one block per expert and nothing else. The backward is written out
  (`jax.custom_vjp`): JAX cannot differentiate a loop whose trip count depends on the data, and
  the hand-written one accumulates each expert's weight gradient in float32 in place.
- `ragged_dot`: `jax.lax.ragged_dot` on rows sorted by expert (GPU and TPU only: XLA:CPU lowers it
  to a dense product over every expert).
- `gmm`: the megablox grouped matmul (a Pallas TPU kernel) on rows sorted by expert and padded to
  its row tile; its gradient is megablox's own (gmm for the rows, tgmm for the weights).
`auto` is resolved per platform before the model sees it (`grouped_kernel`).

An expert index equal to the number of experts marks a row that has no expert (an empty slot of
an expert-parallel exchange buffer): it is not computed and its output is zero.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import megablox

from hanuman_jax.config import ConfigError
from hanuman_jax.model.layers import group_ranks
from hanuman_jax.sharding import per_device

Array = jax.Array
GMM_TILE = 128  # megablox's default tile along rows, contraction and output columns
# Runs `gmm` in Pallas interpret mode, so that tests check the TPU kernel on a CPU.
INTERPRET = False


def _cannot_run(requested: str, dtype: str, platform: str, expert_parallel: bool) -> str | None:
    """Why kernel `requested` cannot run on `platform` in `dtype` (None: it can)."""
    if requested == "ragged_dot" and platform == "cpu":
        return (
            "config model.moe.grouped_matmul='ragged_dot' is invalid on CPU: XLA:CPU lowers "
            "it to a dense product over every expert; use 'blocked'"
        )
    if requested == "gmm" and platform != "tpu":
        return (
            f"config model.moe.grouped_matmul='gmm' cannot run on {platform}: megablox gmm is a "
            "TPU kernel; use 'auto'"
        )
    if requested == "gmm" and dtype == "float16":
        return (
            "config model.moe.grouped_matmul='gmm' cannot run with model.dtype=float16: megablox "
            "gmm takes bfloat16 or float32; use 'auto'"
        )
    if requested == "gmm" and expert_parallel:
        return (
            "config model.moe.grouped_matmul='gmm' cannot run with the experts split over devices: "
            "megablox's Pallas call does not type its output for shard_map; use 'auto'"
        )
    return None


def grouped_kernel(
    requested: str,
    dtype: str,
    platform: str,
    *,
    expert_parallel: bool = False,
    strict: bool = True,
) -> str:
    """`model.moe.grouped_matmul` resolved on `platform`: auto takes blocked on CPU, gmm on TPU
    (ragged_dot in float16 or with the experts split over devices, where gmm cannot run) and
    ragged_dot on GPU. A kernel named that cannot run there is a ConfigError, or without
    `strict` (inference) gives way to auto's choice."""
    why = _cannot_run(requested, dtype, platform, expert_parallel)
    if why and strict:
        raise ConfigError(why)
    if requested != "auto" and not why:
        return requested
    if platform == "tpu":
        return "ragged_dot" if _cannot_run("gmm", dtype, platform, expert_parallel) else "gmm"
    return "ragged_dot" if platform == "gpu" else "blocked"


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


def _gmm(lhs: Array, rhs_E: Array, sizes_E: Array) -> Array:
    # a full tile along both widths even past a small one: megablox masks the excess, and the
    # backward's transposed product can take the same tiling (Mosaic wants multiples of 128)
    tiling = (min(GMM_TILE, lhs.shape[0]), GMM_TILE, GMM_TILE)
    return megablox.gmm(lhs, rhs_E, sizes_E, lhs.dtype, tiling, interpret=INTERPRET)


def _gmm_rows(num_rows: int) -> int:
    """Rows padded to a multiple of gmm's row tile (min(GMM_TILE, rows rounded up to 8))."""
    tile = min(GMM_TILE, -(-num_rows // 8) * 8)
    return -(-num_rows // tile) * tile


def _sorted(x_RD, expert_R, w_gate_EDF, w_up_EDF, w_down_EFD, *, impl: str):
    """The SwiGLU as three grouped matmuls over rows sorted by expert (ragged_dot or gmm)."""
    num_rows, num_experts = x_RD.shape[0], w_gate_EDF.shape[0]
    matmul = _gmm if impl == "gmm" else jax.lax.ragged_dot
    padded = _gmm_rows(num_rows) if impl == "gmm" else num_rows
    order_R = jnp.argsort(expert_R, stable=True)  # rows without an expert sort last
    sizes_E = jnp.bincount(expert_R, length=num_experts).astype(jnp.int32)
    x_PD = jnp.pad(x_RD.at[order_R].get(unique_indices=True), ((0, padded - num_rows), (0, 0)))
    # no group covers the rows past the experts' (gmm leaves their outputs and gradients unset)
    grouped_P = jnp.arange(padded) < jnp.sum(sizes_E)
    x_PD = jnp.where(grouped_P[:, None], x_PD, 0)
    gate_PF, up_PF = matmul(x_PD, w_gate_EDF, sizes_E), matmul(x_PD, w_up_EDF, sizes_E)
    y_PD = jnp.where(
        grouped_P[:, None], matmul(jax.nn.silu(gate_PF) * up_PF, w_down_EFD, sizes_E), 0
    )
    return jnp.zeros_like(x_RD).at[order_R].set(y_PD[:num_rows], unique_indices=True)


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
    order, outputs in the same order. `impl` is a resolved kernel (an unresolved auto runs
    blocked, its choice on a CPU)."""
    # Inside shard_map every input must vary over the same axes: the hand-written backward then
    # returns weight gradients with the rows' axes, and this cast's transpose sums them over.
    inputs = (x_RD, expert_R, w_gate_EDF, w_up_EDF, w_down_EFD)
    axes = _vma(*inputs)
    inputs = tuple(_varying(a, axes) for a in inputs)
    if impl == "gmm":  # per device: the weights gathered whole, their gradients summed
        rows = (("batch", None), ("batch",), (), (), ())
        return per_device(functools.partial(_sorted, impl="gmm"), rows, ("batch", None))(*inputs)
    if impl == "ragged_dot":
        return _sorted(*inputs, impl=impl)
    return _blocked(block_rows(x_RD.shape[0], w_gate_EDF.shape[0], block_size))(*inputs)
