"""Attention kernels: XLA's (all scores at once, or `model.attention_block` query rows at a
time), cuDNN flash attention and Pallas splash attention (TPU). Which one `model.attention` means
on a device is decided where a setup is built (planning/targets.py); the model is handed the fused
kernel it runs."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from hanuman_jax.config import ConfigError
from hanuman_jax.sharding import per_device

Array = jax.Array
log = logging.getLogger("hanuman_jax")
SPLASH_BLOCKS = (512, 256, 128)  # splash attention's tiles, largest first

# A fused attention: (q_BTNH, k_BSKH, v_BSKH, segment_ids_BT) -> out_BTNH, causal within each
# packed document, for rows of even length (cuDNN trains a masked attention on those only).
Kernel = Callable[[Array, Array, Array, Array], Array]


def xla_attention(
    q_BTNH: Array,
    k_BSKH: Array,
    v_BSKH: Array,
    segment_ids_BT: Array,
    key_segment_ids_BS: Array | None = None,
    start: Array | int = 0,
) -> Array:
    """Causal attention within each packed document, all T x S scores at once (GQA: N query
    heads share K key/value heads); the backward keeps the probabilities. Query row t sits at key
    position start + t and keys have their own segment ids (a KV cache); by default the keys are
    the queries' own tokens."""
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    if key_segment_ids_BS is None:
        key_segment_ids_BS = segment_ids_BT
    mask_B11TS = doc_causal_mask(segment_ids_BT, key_segment_ids_BS, start)
    logits_BKGTS = block_logits(q_BTNH.reshape(b, t, kv, n // kv, h), k_BSKH, mask_B11TS)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(q_BTNH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


def fused_attention(
    q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, segment_ids_BT: Array, implementation: str
) -> Array:
    """jax.nn.dot_product_attention, causal and within each packed document (GQA: N query heads
    share K key/value heads). The cuDNN kernel; tests run the same call with implementation=xla."""
    same_doc_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=same_doc_B1TS, is_causal=True, implementation=implementation
    )


def cudnn_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, segment_ids_BT: Array) -> Array:
    """cuDNN flash attention: the `Kernel` that `model.attention` cudnn (or auto where it runs)
    means."""
    return fused_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, "cudnn")


def splash_block(t: int) -> int:
    """The largest splash attention tile that divides rows of `t` tokens; 0 where none does."""
    return next((c for c in SPLASH_BLOCKS if t % c == 0), 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, n: int, interpret: bool) -> splash.SplashAttentionKernel:
    """The splash kernel for [N, T, H] queries, causal, in tiles of `splash_block(t)` rows.

    MHA mode takes GQA as it is: query head n reads kv head n // G (our grouping), and the
    backward sums each group's dk, dv, with no copies of k and v (MQA mode is one kv head)."""
    c = splash_block(t)
    blocks = splash.BlockSizes(block_q=c, block_kv=c, block_kv_compute=c, block_q_dkv=c,
                               block_kv_dkv=c, block_kv_dkv_compute=c, block_q_dq=c,
                               block_kv_dq=c)  # fmt: skip
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((t, t))] * n)
    with jax.ensure_compile_time_eval():  # its mask tables are constants, cached across traces
        return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)  # fmt: skip


def _splash_local(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, interpret: bool) -> Array:
    _, t, n, h = q_BTNH.shape
    kernel = _splash_kernel(t, n, interpret)
    q_BNTH = jnp.swapaxes(q_BTNH / jnp.asarray(math.sqrt(h), q_BTNH.dtype), 1, 2)  # unscaled in it
    k_BKSH, v_BKSH = jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKH, 1, 2)
    segment_ids = splash.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segment_ids=segment_ids)
    return jnp.swapaxes(out_BNTH, 1, 2)


def splash_attention(
    q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, segment_ids_BT: Array, interpret: bool = False
) -> Array:
    """Pallas splash attention, causal within each packed document (GQA), for rows of a multiple
    of 128 tokens. Under a mesh in context it runs per device on its rows and heads (XLA cannot
    split a Pallas call); `interpret` runs it on any backend (tests)."""
    q_axes, kv_axes = ("batch", None, "heads", None), ("batch", None, "kv_heads", None)
    local = per_device(functools.partial(_splash_local, interpret=interpret),
                       (q_axes, kv_axes, kv_axes, ("batch", None)), q_axes)  # fmt: skip
    return local(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)


@functools.cache
def _log_fallback(t: int) -> None:
    """Once per row length, not once per layer and trace."""
    log.info("attention: rows of %d tokens are no multiple of 128, so XLA's attention runs", t)


def _splash_or_xla(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, block, strict, interpret) -> Array:
    t = q_BTNH.shape[1]
    if splash_block(t):
        return splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, interpret)
    if strict:
        raise ConfigError(
            f"config model.attention=splash cannot run rows of {t} tokens: splash attention "
            "needs a multiple of 128 (data.seq_len); use auto or xla"
        )
    _log_fallback(t)
    if block and t > block:
        return blockwise_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, block)
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)


@functools.lru_cache(maxsize=16)
def splash_kernel(block: int, strict: bool, interpret: bool = False) -> Kernel:
    """The `Kernel` that `model.attention` splash (or auto on a TPU) means: splash attention on
    rows it tiles; on others XLA's attention (in blocks of `block` query rows), or under
    `strict` (splash asked for by name) a ConfigError. One kernel per arguments: models built
    with it are cached by it."""
    return functools.partial(_splash_or_xla, block=block, strict=strict, interpret=interpret)


def softmax_rows(dout_BTKGH: Array, out_BTKGH: Array) -> Array:
    """sum_s p dp of each query row and head, which is sum_h dout * out: [B, T, K, G], float32."""
    f32 = jnp.float32
    return jnp.sum(dout_BTKGH.astype(f32) * out_BTKGH.astype(f32), axis=-1)


def block_grads(probs_BKGCS, q_BCKGH, k_BSKH, v_BSKH, dout_BCKGH, row_BCKG):
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


def doc_causal_mask(seg_q_BC: Array, seg_k_BS: Array, start) -> Array:
    """[B, 1, 1, C, S]: query row start + c may see key s (s <= start + c, same document)."""
    c, s = seg_q_BC.shape[1], seg_k_BS.shape[1]
    causal_CS = (jnp.arange(c)[:, None] + start) >= jnp.arange(s)[None, :]
    same_doc_BCS = seg_q_BC[:, :, None] == seg_k_BS[:, None, :]
    return (causal_CS[None] & same_doc_BCS)[:, None, None]


def block_logits(q_BCKGH, k_BSKH, mask_B11CS) -> Array:
    """Scaled logits [B, K, G, C, S] in float32, -inf where the mask is False."""
    h = q_BCKGH.shape[-1]
    logits = jnp.einsum("BCKGH,BSKH->BKGCS", q_BCKGH, k_BSKH, preferred_element_type=jnp.float32)
    return jnp.where(mask_B11CS, logits / math.sqrt(h), -jnp.inf)


def _split(x_BT, block: int) -> Array:
    """[B, T, ...] -> [T / block, B, block, ...]: the blocks of rows, leading."""
    b, t = x_BT.shape[:2]
    return jnp.moveaxis(x_BT.reshape(b, t // block, block, *x_BT.shape[2:]), 1, 0)


def _join(x_MBC) -> Array:
    """[T / block, B, block, ...] -> [B, T, ...]."""
    m, b, c = x_MBC.shape[:3]
    return jnp.moveaxis(x_MBC, 0, 1).reshape(b, m * c, *x_MBC.shape[3:])


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
        mask = doc_causal_mask(seg_BC, segment_ids_BT, i * c)
        logits_BKGCS = block_logits(q_BCKGH, k_BSKH, mask)
        lse_BKGC = jax.nn.logsumexp(logits_BKGCS, axis=-1)
        probs_BKGCS = jnp.exp(logits_BKGCS - lse_BKGC[..., None]).astype(dt)
        return None, (jnp.einsum("BKGCS,BSKH->BCKGH", probs_BKGCS, v_BSKH), lse_BKGC)

    q_MBCKGH = _split(q_BTNH.reshape(b, t, kv, n // kv, h), c)
    xs = (jnp.arange(t // c), q_MBCKGH, _split(segment_ids_BT, c))
    _, (out_MBCKGH, lse_MBKGC) = jax.lax.scan(body, None, xs)
    out_BTNH = _join(out_MBCKGH).reshape(b, t, n, h)
    return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, out_BTNH, lse_MBKGC)


def _blockwise_backward(block, residuals, dout_BTNH):
    q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, out_BTNH, lse_MBKGC = residuals
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    c = _block_size(t, block)
    f32 = jnp.float32
    shape5 = (b, t, kv, n // kv, h)
    dout_BTKGH = dout_BTNH.reshape(shape5)
    row_BTKG = softmax_rows(dout_BTKGH, out_BTNH.reshape(shape5))

    def body(carry, xs):
        dk_BSKH, dv_BSKH = carry
        i, q_BCKGH, seg_BC, dout_BCKGH, row_BCKG, lse_BKGC = xs
        mask = doc_causal_mask(seg_BC, segment_ids_BT, i * c)
        probs_BKGCS = jnp.exp(block_logits(q_BCKGH, k_BSKH, mask) - lse_BKGC[..., None])
        dq_BCKGH, dk, dv = block_grads(probs_BKGCS, q_BCKGH, k_BSKH, v_BSKH, dout_BCKGH, row_BCKG)
        return (dk_BSKH + dk, dv_BSKH + dv), dq_BCKGH

    xs = (
        jnp.arange(t // c),
        _split(q_BTNH.reshape(shape5), c),
        _split(segment_ids_BT, c),
        _split(dout_BTKGH, c),
        _split(row_BTKG, c),
        lse_MBKGC,
    )
    zeros = (jnp.zeros(k_BSKH.shape, f32), jnp.zeros(v_BSKH.shape, f32))
    (dk_BSKH, dv_BSKH), dq_MBCKGH = jax.lax.scan(body, zeros, xs)
    no_grad = np.zeros(segment_ids_BT.shape, jax.dtypes.float0)
    return (
        _join(dq_MBCKGH).reshape(b, t, n, h).astype(q_BTNH.dtype),
        dk_BSKH.astype(k_BSKH.dtype),
        dv_BSKH.astype(v_BSKH.dtype),
        no_grad,
    )


blockwise_attention.defvjp(_blockwise_forward, _blockwise_backward)
