"""The memory planner's stand-in for cuDNN flash attention.

The planner traces the train step on this process's backend (usually a CPU) while planning for
another. Where the target runs cuDNN flash attention, the planner's model runs `cudnn_stand_in`:
the same function, keeping for the backward exactly what JAX's cuDNN rule keeps (q, k, v, the
additive mask, the softmax statistics and the output), not XLA's T x T probabilities. That is the
difference between "fits" and "does not fit" at long sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hanuman_jax.model.attention import block_grads, block_logits, softmax_rows

Array = jax.Array


def cudnn_stand_in(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, segment_ids_BT: Array) -> Array:
    """Causal attention within each packed document (GQA), as `model.attention.cudnn_attention`
    computes it, with the residuals of JAX's cuDNN rule."""
    same_doc_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
    return _stand_in(q_BTNH, k_BSKH, v_BSKH, same_doc_B1TS)


def _scores(q_BTKGH: Array, k_BSKH: Array, bias_B1TS: Array) -> Array:
    """Scaled causal logits [B, K, G, T, S] in float32 plus the additive bias."""
    t, s = q_BTKGH.shape[1], k_BSKH.shape[1]
    causal_11TS = jnp.tril(jnp.ones((t, s), bool))[None, None]
    logits = block_logits(q_BTKGH, k_BSKH, causal_11TS[:, :, None])
    return logits + bias_B1TS[:, :, None].astype(jnp.float32)


@jax.custom_vjp
def _stand_in(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_B1TS: Array) -> Array:
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
    row_BTKG = softmax_rows(dout_BTKGH, out_BTNH.reshape(shape5))
    dq_BTKGH, dk_BSKH, dv_BSKH = block_grads(
        probs_BKGTS, q_BTKGH, k_BSKH, v_BSKH, dout_BTKGH, row_BTKG
    )
    no_grad = np.zeros(bias_B1TS.shape, jax.dtypes.float0)
    return (
        dq_BTKGH.reshape(b, t, n, h).astype(q_BTNH.dtype),
        dk_BSKH.astype(k_BSKH.dtype),
        dv_BSKH.astype(v_BSKH.dtype),
        no_grad,
    )


_stand_in.defvjp(_stand_in_forward, _stand_in_backward)
