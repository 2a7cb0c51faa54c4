"""Attention kernels: XLA's (all scores at once, or `model.attention_block` query rows at a
time), cuDNN flash attention, and which one `model.attention` means on a device.

The memory planner traces the train step on this process's backend (usually a CPU) while planning
for another (`python -m hanuman_jax.memory --device h100`). Under `planning_for(target)`, `auto`
resolves as it would on the target, and where that is cuDNN flash attention the trace runs
`_cudnn_stand_in`: the same function, keeping for the backward exactly what JAX's cuDNN rule
keeps (q, k, v, the additive mask, the softmax statistics and the output), not XLA's T x T
probabilities. That is the difference between "fits" and "does not fit" at long sequences.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np

from hanuman_jax.config import ConfigError

Array = jax.Array


class Target(typing.NamedTuple):
    """What decides the attention kernel: the platform and, on NVIDIA GPUs, compute capability."""

    platform: str  # cpu, gpu or tpu
    capability: float = 0.0  # CUDA compute capability (a T4 is 7.5, an A100 8.0, an H100 9.0)


_planning: contextvars.ContextVar[Target | None] = contextvars.ContextVar("planning", default=None)


@contextlib.contextmanager
def planning_for(target: Target):
    """Resolve `model.attention` for `target` instead of this process's device (memory planner)."""
    token = _planning.set(target)
    try:
        yield
    finally:
        _planning.reset(token)


def current_target() -> Target:
    """The target being planned for, or this process's first device."""
    planned = _planning.get()
    if planned is not None:
        return planned
    device = jax.devices()[0]
    return Target(device.platform, float(getattr(device, "compute_capability", 0) or 0))


def attention_impl(requested: str, dtype: str, head_dim: int) -> str:
    """`model.attention` resolved on the current target: auto takes cuDNN flash attention where
    it runs (an NVIDIA GPU of compute capability 8.0 or more, bf16/fp16, head_dim a multiple of 8
    up to 128; a T4 is 7.5) and XLA's attention otherwise."""
    target = current_target()
    fits = dtype in ("bfloat16", "float16") and head_dim % 8 == 0 and head_dim <= 128
    runs = target.platform == "gpu" and target.capability >= 8.0 and fits
    if requested == "cudnn" and not runs:
        raise ConfigError(
            f"config model.attention=cudnn cannot run here ({target.platform}, capability "
            f"{target.capability:g}, model.dtype={dtype}, head_dim {head_dim}): it needs an NVIDIA "
            "GPU of compute capability 8.0+, bfloat16 or float16 and head_dim a multiple of 8 up "
            "to 128; use auto or xla"
        )
    if requested == "auto":
        return "cudnn" if runs else "xla"
    return requested


def xla_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, segment_ids_BT: Array) -> Array:
    """Causal attention within each packed document, all T x T scores at once (GQA: N query
    heads share K key/value heads); the backward keeps the probabilities."""
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    mask_B11TS = _doc_causal_mask(segment_ids_BT, segment_ids_BT, 0)
    logits_BKGTS = _block_logits(q_BTNH.reshape(b, t, kv, n // kv, h), k_BSKH, mask_B11TS)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(q_BTNH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


def fused_attention(
    q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, segment_ids_BT: Array, implementation: str
) -> Array:
    """jax.nn.dot_product_attention, causal and within each packed document (GQA: N query heads
    share K key/value heads). The cuDNN path; tests run the same call with implementation=xla."""
    same_doc_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
    if implementation == "cudnn" and _planning.get() is not None and jax.default_backend() != "gpu":
        return _cudnn_stand_in(q_BTNH, k_BSKH, v_BSKH, same_doc_B1TS)
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=same_doc_B1TS, is_causal=True, implementation=implementation
    )


def _scores(q_BTKGH: Array, k_BSKH: Array, bias_B1TS: Array) -> Array:
    """Scaled causal logits [B, K, G, T, S] in float32 plus the additive bias."""
    t, s = q_BTKGH.shape[1], k_BSKH.shape[1]
    causal_11TS = jnp.tril(jnp.ones((t, s), bool))[None, None]
    logits = _block_logits(q_BTKGH, k_BSKH, causal_11TS[:, :, None])
    return logits + bias_B1TS[:, :, None].astype(jnp.float32)


@jax.custom_vjp
def _cudnn_stand_in(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_B1TS: Array) -> Array:
    return _stand_in_forward(q_BTNH, k_BSKH, v_BSKH, mask_B1TS)[0]


def _stand_in_forward(q_BTNH, k_BSKH, v_BSKH, mask_B1TS):
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    dt = q_BTNH.dtype
    # an additive bias in the compute dtype, as JAX's cuDNN call makes of a boolean mask (its
    # masked value differs; the planner needs only the size)
    bias_B1TS = jnp.where(mask_B1TS, jnp.asarray(0, dt), jnp.asarray(jnp.finfo(dt).min / 2, dt))
    logits_BKGTS = _scores(q_BTNH.reshape(b, t, kv, n // kv, h), k_BSKH, bias_B1TS)
    lse_BKGT = jax.nn.logsumexp(logits_BKGTS, axis=-1)
    probs_BKGTS = jnp.exp(logits_BKGTS - lse_BKGT[..., None]).astype(dt)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    out_BTNH = out_BTKGH.reshape(b, t, n, h)
    # the residuals of JAX's cuDNN rule: inputs, bias, softmax statistics (float32) and output
    return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, bias_B1TS, lse_BKGT, out_BTNH)


def _stand_in_backward(residuals, dout_BTNH):
    q_BTNH, k_BSKH, v_BSKH, bias_B1TS, lse_BKGT, out_BTNH = residuals
    b, t, n, h = q_BTNH.shape
    shape5 = (b, t, k_BSKH.shape[2], n // k_BSKH.shape[2], h)
    q_BTKGH, dout_BTKGH = q_BTNH.reshape(shape5), dout_BTNH.reshape(shape5)
    probs_BKGTS = jnp.exp(_scores(q_BTKGH, k_BSKH, bias_B1TS) - lse_BKGT[..., None])
    row_BTKG = _softmax_rows(dout_BTKGH, out_BTNH.reshape(shape5))
    dq_BTKGH, dk_BSKH, dv_BSKH = _block_grads(
        probs_BKGTS, q_BTKGH, k_BSKH, v_BSKH, dout_BTKGH, row_BTKG
    )
    no_grad = np.zeros(bias_B1TS.shape, jax.dtypes.float0)
    return (
        dq_BTKGH.reshape(b, t, n, h).astype(q_BTNH.dtype),
        dk_BSKH.astype(k_BSKH.dtype),
        dv_BSKH.astype(v_BSKH.dtype),
        no_grad,
    )


def _softmax_rows(dout_BTKGH: Array, out_BTKGH: Array) -> Array:
    """sum_s p dp of each query row and head, which is sum_h dout * out: [B, T, K, G], float32."""
    f32 = jnp.float32
    return jnp.sum(dout_BTKGH.astype(f32) * out_BTKGH.astype(f32), axis=-1)


def _block_grads(probs_BKGCS, q_BCKGH, k_BSKH, v_BSKH, dout_BCKGH, row_BCKG):
    """One block of query rows' share of the attention gradients, from its float32
    probabilities (recomputed): dq of the block, and its contributions to dk and dv (float32).
    Softmax backward: dlogits = p * (dp - sum_s p dp); the matmuls take the compute dtype."""
    f32, dt = jnp.float32, dout_BCKGH.dtype
    h = q_BCKGH.shape[-1]
    dv_BSKH = jnp.einsum("BKGCS,BCKGH->BSKH", probs_BKGCS.astype(dt), dout_BCKGH,
                         preferred_element_type=f32)  # fmt: skip
    dprobs_BKGCS = jnp.einsum("BCKGH,BSKH->BKGCS", dout_BCKGH, v_BSKH,
                              preferred_element_type=f32)  # fmt: skip
    row_BKGC1 = jnp.moveaxis(row_BCKG, 1, -1)[..., None]
    dlogits_BKGCS = (probs_BKGCS * (dprobs_BKGCS - row_BKGC1) / math.sqrt(h)).astype(dt)
    dq_BCKGH = jnp.einsum("BKGCS,BSKH->BCKGH", dlogits_BKGCS, k_BSKH, preferred_element_type=f32)
    dk_BSKH = jnp.einsum("BKGCS,BCKGH->BSKH", dlogits_BKGCS, q_BCKGH, preferred_element_type=f32)
    return dq_BCKGH, dk_BSKH, dv_BSKH


_cudnn_stand_in.defvjp(_stand_in_forward, _stand_in_backward)


def _doc_causal_mask(seg_q_BC: Array, seg_k_BS: Array, start) -> Array:
    """[B, 1, 1, C, S]: query row start + c may see key s (s <= start + c, same document)."""
    c, s = seg_q_BC.shape[1], seg_k_BS.shape[1]
    causal_CS = (jnp.arange(c)[:, None] + start) >= jnp.arange(s)[None, :]
    same_doc_BCS = seg_q_BC[:, :, None] == seg_k_BS[:, None, :]
    return (causal_CS[None] & same_doc_BCS)[:, None, None]


def _block_logits(q_BCKGH, k_BSKH, mask_B11CS) -> Array:
    h = q_BCKGH.shape[-1]
    logits = jnp.einsum("BCKGH,BSKH->BKGCS", q_BCKGH, k_BSKH, preferred_element_type=jnp.float32)
    return jnp.where(mask_B11CS, logits / math.sqrt(h), -jnp.inf)


def _split(x_BT, block: int) -> Array:
    """[B, T, ...] -> [T / block, B, block, ...]: the blocks of rows, leading."""
    b, t = x_BT.shape[:2]
    return jnp.moveaxis(x_BT.reshape(b, t // block, block, *x_BT.shape[2:]), 1, 0)


def _join(x_NBC) -> Array:
    """[T / block, B, block, ...] -> [B, T, ...]."""
    n, b, c = x_NBC.shape[:3]
    return jnp.moveaxis(x_NBC, 0, 1).reshape(b, n * c, *x_NBC.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blockwise_attention(
    q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, segment_ids_BT: Array, block: int
) -> Array:
    """Causal attention within each packed document, `block` query rows at a time (a scan, so
    only one block x T slice of scores exists at once; one block when `block` does not divide T).

    The backward keeps q, k, v, the output and each row's log-sum-exp (float32), and recomputes
    each block's probabilities from them, as flash attention does: nothing T x T is kept."""
    return _blockwise_forward(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, block)[0]


def _block_size(t: int, block: int) -> int:
    return block if t % block == 0 else t


def _blockwise_forward(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, block):
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    dt = q_BTNH.dtype
    c = _block_size(t, block)

    def body(_, xs):
        i, q_BCKGH, seg_BC = xs
        mask = _doc_causal_mask(seg_BC, segment_ids_BT, i * c)
        logits_BKGCS = _block_logits(q_BCKGH, k_BSKH, mask)
        lse_BKGC = jax.nn.logsumexp(logits_BKGCS, axis=-1)
        probs_BKGCS = jnp.exp(logits_BKGCS - lse_BKGC[..., None]).astype(dt)
        return None, (jnp.einsum("BKGCS,BSKH->BCKGH", probs_BKGCS, v_BSKH), lse_BKGC)

    q_NBCKGH = _split(q_BTNH.reshape(b, t, kv, n // kv, h), c)
    xs = (jnp.arange(t // c), q_NBCKGH, _split(segment_ids_BT, c))
    _, (out_NBCKGH, lse_NBKGC) = jax.lax.scan(body, None, xs)
    out_BTNH = _join(out_NBCKGH).reshape(b, t, n, h)
    return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, out_BTNH, lse_NBKGC)


def _blockwise_backward(block, residuals, dout_BTNH):
    q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, out_BTNH, lse_NBKGC = residuals
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    c = _block_size(t, block)
    f32 = jnp.float32
    shape5 = (b, t, kv, n // kv, h)
    dout_BTKGH = dout_BTNH.reshape(shape5)
    row_BTKG = _softmax_rows(dout_BTKGH, out_BTNH.reshape(shape5))

    def body(carry, xs):
        dk_BSKH, dv_BSKH = carry
        i, q_BCKGH, seg_BC, dout_BCKGH, row_BCKG, lse_BKGC = xs
        mask = _doc_causal_mask(seg_BC, segment_ids_BT, i * c)
        probs_BKGCS = jnp.exp(_block_logits(q_BCKGH, k_BSKH, mask) - lse_BKGC[..., None])
        dq_BCKGH, dk, dv = _block_grads(probs_BKGCS, q_BCKGH, k_BSKH, v_BSKH, dout_BCKGH, row_BCKG)
        return (dk_BSKH + dk, dv_BSKH + dv), dq_BCKGH

    xs = (
        jnp.arange(t // c),
        _split(q_BTNH.reshape(shape5), c),
        _split(segment_ids_BT, c),
        _split(dout_BTKGH, c),
        _split(row_BTKG, c),
        lse_NBKGC,
    )
    zeros = (jnp.zeros(k_BSKH.shape, f32), jnp.zeros(v_BSKH.shape, f32))
    (dk_BSKH, dv_BSKH), dq_NBCKGH = jax.lax.scan(body, zeros, xs)
    no_grad = np.zeros(segment_ids_BT.shape, jax.dtypes.float0)
    return (
        _join(dq_NBCKGH).reshape(b, t, n, h).astype(q_BTNH.dtype),
        dk_BSKH.astype(k_BSKH.dtype),
        dv_BSKH.astype(v_BSKH.dtype),
        no_grad,
    )


blockwise_attention.defvjp(_blockwise_forward, _blockwise_backward)
