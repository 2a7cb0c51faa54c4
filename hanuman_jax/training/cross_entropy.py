"""Cross-entropy of the LM head's logits without keeping the logits: `linear_cross_entropy`.

The logits of a whole batch (tokens x vocabulary, float32) are the largest array of a step, and
the plain formulation passes over them many times: the matmul writes them, the log-sum-exp
reads them twice, the backward writes the softmax gradient and reads it into two more matmuls.
Here the rows go through in chunks: each chunk's logits, log-sum-exp and gradient (softmax minus
one-hot) are made while the chunk is in cache, and the forward pass already leaves the gradients
of the hidden states and of the head's weight; the backward only scales them by the loss's
cotangent. The FLOPs are the same three matmuls, and on CPU the whole is faster than the plain
formulation (BENCHMARKS.md). A chunk holds whole sequences, or, with a large vocabulary and long
sequences, pieces of them (`chunk_plan`), so that one sequence's logits need not fit at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _chunk(h_CD: Array, w_VD: Array, target_C: Array, weight_C: Array):
    """One chunk's weighted loss sum, and exp(logits - max) and its row sums (for the gradient)."""
    logits_CV = jnp.matmul(h_CD, w_VD.T, preferred_element_type=jnp.float32)
    max_C1 = jnp.max(logits_CV, axis=-1, keepdims=True)
    exp_CV = jnp.exp(logits_CV - max_C1)
    sum_C1 = jnp.sum(exp_CV, axis=-1, keepdims=True)
    log_z_C = (max_C1 + jnp.log(sum_C1))[:, 0]
    target_logit_C = jnp.take_along_axis(logits_CV, target_C[:, None], axis=-1)[:, 0]
    return jnp.sum((log_z_C - target_logit_C) * weight_C), exp_CV, sum_C1


@jax.custom_vjp
def _chunked(h_MCD: Array, w_VD: Array, target_MC: Array, weight_MC: Array) -> Array:
    def body(total, chunk):
        return total + _chunk(chunk[0], w_VD, chunk[1], chunk[2])[0], None

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(body, zero, (h_MCD, target_MC, weight_MC))[0]


def _forward(h_MCD, w_VD, target_MC, weight_MC):
    f32 = jnp.float32
    vocab = w_VD.shape[0]
    w32_VD = w_VD.astype(f32)

    def body(carry, chunk):
        total, dw_VD = carry
        h_CD, target_C, weight_C = chunk
        loss, exp_CV, sum_C1 = _chunk(h_CD, w_VD, target_C, weight_C)
        onehot_CV = jax.nn.one_hot(target_C, vocab, dtype=f32)
        dlogits_CV = (exp_CV / sum_C1 - onehot_CV) * weight_C[:, None]
        dh_CD = jnp.matmul(dlogits_CV, w32_VD)
        dw_VD = dw_VD + jnp.matmul(dlogits_CV.T, h_CD.astype(f32))
        return (total + loss, dw_VD), dh_CD

    init = (jnp.zeros((), f32), jnp.zeros(w_VD.shape, f32))
    (total, dw_VD), dh_MCD = jax.lax.scan(body, init, (h_MCD, target_MC, weight_MC))
    # float32 until the backward has the cotangent: under float16 it is the loss scale, and the
    # unscaled gradients (about 1 / targets) would underflow in float16 before it is applied
    dtypes = (jnp.zeros((0,), h_MCD.dtype), jnp.zeros((0,), w_VD.dtype))  # what to cast back to
    return total, (dh_MCD, dw_VD, target_MC, weight_MC, dtypes)


def _backward(residuals, g):
    dh_MCD, dw_VD, target_MC, weight_MC, (h_like, w_like) = residuals
    g = g.astype(jnp.float32)
    no_grad = np.zeros(target_MC.shape, jax.dtypes.float0)
    # the weights are data (mask / number of targets): not differentiated
    return ((dh_MCD * g).astype(h_like.dtype), (dw_VD * g).astype(w_like.dtype), no_grad,
            jnp.zeros_like(weight_MC))  # fmt: skip


_chunked.defvjp(_forward, _backward)


def linear_cross_entropy(
    h_BTD: Array, w_VD: Array, target_BT: Array, weight_BT: Array, *, chunks: int, pieces: int = 1
) -> Array:
    """sum over (b, t) of weight[b, t] x (logsumexp(logits[b, t]) - logits[b, t, target[b, t]]),
    logits = h @ w.T in float32. Each sequence is cut into `pieces` equal pieces (the last one
    padded with untrained positions), and the B x pieces rows into `chunks` chunks of rows
    (chunk k: rows k, k + chunks, ..., so that a batch split over devices keeps rows of every
    chunk on every device). Differentiable in h and w."""
    b, t = target_BT.shape
    rows = b * pieces
    if rows % chunks:
        raise ValueError(f"{b} rows x {pieces} pieces do not split into {chunks} chunks")
    weight_BT = weight_BT.astype(jnp.float32)
    if pieces > 1:
        pad = -t % pieces
        if pad:
            h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
            target_BT = jnp.pad(target_BT, ((0, 0), (0, pad)))
            weight_BT = jnp.pad(weight_BT, ((0, 0), (0, pad)))  # padding: weight 0, no gradient
        piece = (t + pad) // pieces  # [B, T] -> [B x pieces, piece], sequence by sequence
        h_BTD = h_BTD.reshape(rows, piece, h_BTD.shape[-1])
        target_BT, weight_BT = target_BT.reshape(rows, piece), weight_BT.reshape(rows, piece)

    def split(x):  # [rows, T, ...] -> [M, rows / M x T, ...]: M chunks of C rows
        x = x.reshape(rows // chunks, chunks, *x.shape[1:]).swapaxes(0, 1)
        return x.reshape(chunks, -1, *x.shape[3:])

    return _chunked(split(h_BTD), w_VD, split(target_BT), split(weight_BT))


def min_chunk_rows(backend: str) -> int:
    """Tokens per chunk at the least. On CPU, chunks of a few hundred rows keep their logits in
    cache (measured in BENCHMARKS.md). GPUs and TPUs want big matmuls; there, 4,096 rows is a
    guess, not yet measured, that still bounds the logits held at once for a 96k vocabulary."""
    return 128 if backend == "cpu" else 4096


# Each device's share of a chunk keeps its float32 logits near this, at most about twice it (the
# gradient takes as many bytes again): a 96k vocabulary at 8,191 targets would otherwise hold
# 3.1 GB of logits for one sequence.
MAX_CHUNK_LOGITS_BYTES = 512 << 20


def chunk_plan(
    batch_rows: int, seq_len: int, vocab: int, batch_shards: int, min_rows: int
) -> tuple[int, int, int]:
    """(pieces per sequence, chunks, token rows per chunk on each device) of
    `linear_cross_entropy` for `batch_rows` sequences of `seq_len` targets over `batch_shards`
    devices. Sequences stay whole while one's logits fit MAX_CHUNK_LOGITS_BYTES, and a chunk
    then takes the fewest sequences that give each device at least min(`min_rows`, that
    many rows); past it, sequences are cut into equal pieces that fit, one per device and chunk
    where the shards allow."""
    cap_rows = max(1, MAX_CHUNK_LOGITS_BYTES // (vocab * 4))
    pieces = max(1, -(-seq_len // cap_rows))
    piece = -(-seq_len // pieces)
    least = min(min_rows, cap_rows if pieces == 1 else piece)
    chunks = chunks_for(batch_rows * pieces, piece, batch_shards, least)
    return pieces, chunks, batch_rows * pieces // chunks // batch_shards * piece


def chunks_for(batch_rows: int, seq_len: int, batch_shards: int, min_rows: int) -> int:
    """The most chunks of whole sequences, the same number on each of `batch_shards` devices,
    that give each device at least `min_rows` token rows per chunk; at least 1."""
    best = 1
    for n in range(1, batch_rows + 1):
        per = batch_rows // n
        shared = batch_rows % n == 0 and per % batch_shards == 0
        if shared and per // batch_shards * seq_len >= min_rows:
            best = n
    return best
