"""Decoder-only transformer in flax.nnx: RMSNorm, GQA with RoPE, SwiGLU or MoE feed-forward."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hanuman_jax.config import ConfigError, ModelConfig, RopeConfig
from hanuman_jax.model.attention import (
    attention_impl,
    blockwise_attention,
    fused_attention,
    xla_attention,
)
from hanuman_jax.model.layers import RMSNorm, param, project
from hanuman_jax.model.moe import MoEFeedForward

Array = jax.Array


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """Inverse frequencies after the configured scaling (same definitions as Hugging Face)."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.scaling == "linear":
        inv = inv / rope.factor
    elif rope.scaling == "llama3":
        low_wavelen = rope.original_context / rope.low_freq_factor
        high_wavelen = rope.original_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_context / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x_BTNH: Array, positions_BT: Array, inv_freq: np.ndarray) -> Array:
    """Rotates the two halves of each head (the `rotate_half` convention)."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BTF)[:, :, None, :]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


@jax.checkpoint
def _swish_gate(gate: Array, up: Array) -> Array:
    """silu(gate) * up, recomputed in the backward from gate and up: the backward keeps two
    hidden-width arrays instead of five (XLA:CPU already recomputes them; the memory planner then
    counts what XLA keeps)."""
    return jax.nn.silu(gate) * up


class Attention(nnx.Module):
    """Grouped-query causal self-attention; tokens attend only within their packed document."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.hd
        pdt = jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.wq = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, pdt)
        self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, pdt)
        self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, pdt)
        self.wo = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, pdt)
        self.rope = cfg.rope
        self.num_kv_heads = k
        self.dtype = jnp.dtype(cfg.dtype)
        self.requested = cfg.attention
        self.impl = attention_impl(cfg.attention, cfg.dtype, h)
        self.block = cfg.attention_block  # 0: the plain attention, all T x T scores at once

    def __call__(self, x_BTD: Array, segment_ids_BT: Array, positions_BT: Array) -> Array:
        dt = self.dtype
        q_BTNH = project(x_BTD, self.wq[...].astype(dt))
        k_BSKH = project(x_BTD, self.wk[...].astype(dt))
        v_BSKH = project(x_BTD, self.wv[...].astype(dt))
        inv_freq = rope_inv_freq(q_BTNH.shape[-1], self.rope)
        q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
        k_BSKH = apply_rope(k_BSKH, positions_BT, inv_freq)
        impl = self.impl
        if impl == "cudnn" and q_BTNH.shape[1] % 2:  # cuDNN trains a masked attention on even rows
            if self.requested == "cudnn":
                raise ConfigError(
                    f"config model.attention=cudnn cannot run rows of {q_BTNH.shape[1]} tokens: "
                    "cuDNN needs an even row length (data.seq_len); use auto or xla"
                )
            impl = "xla"
        if impl == "cudnn":
            out_BTNH = fused_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, "cudnn")
        elif self.block and q_BTNH.shape[1] > self.block:  # one block would be all the scores
            out_BTNH = blockwise_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, self.block)
        else:
            out_BTNH = xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
        return project(out_BTNH, self.wo[...].astype(dt), contract=2)


class FeedForward(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ffn_hidden
        pdt = jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.w_gate = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pdt)
        self.w_up = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, pdt)
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), out_std, pdt)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BTD: Array) -> Array:
        dt = self.dtype
        gate_BTF = project(x_BTD, self.w_gate[...].astype(dt))
        up_BTF = project(x_BTD, self.w_up[...].astype(dt))
        return project(_swish_gate(gate_BTF, up_BTF), self.w_down[...].astype(dt))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        if cfg.moe.num_experts:
            self.moe = MoEFeedForward(cfg, rngs=rngs)
        else:
            self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, x_BTD, segment_ids_BT, positions_BT, rng=None):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), segment_ids_BT, positions_BT)
        h_BTD = self.ffn_norm(x_BTD)
        if hasattr(self, "moe"):
            out_BTD, aux = self.moe(h_BTD, valid_BT=segment_ids_BT != 0, rng=rng)
        else:
            out_BTD, aux = self.mlp(h_BTD), {}
        return x_BTD + out_BTD, aux


def _block_call(remat: str):
    """How a block is called: as it is, or under jax.checkpoint. `full` keeps only the block's
    input for the backward pass and recomputes the rest; `save_matmuls` also keeps the outputs of
    the 2-D matmuls (the projections: every matmul without a batch dimension) and recomputes the
    attention scores, norms, activations and the experts' batched matmuls."""

    def call(block, *args):
        return block(*args)

    if remat == "none":
        return call
    policy = None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nnx.remat(call, policy=policy)


SUMMED_AUX = ("aux_loss", "z_loss")  # MoE losses summed over layers; other aux are per layer


class Transformer(nnx.Module):
    """Token embedding, `num_layers` pre-norm blocks, final RMSNorm, LM head (tied or not)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = param(
            rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt
        )
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(
                rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt
            )

    def __call__(
        self,
        tokens_BT: Array,
        segment_ids_BT: Array | None = None,
        positions_BT: Array | None = None,
        rng: Array | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """Returns float32 logits and the MoE auxiliaries: `aux_loss` and `z_loss` summed over
        layers, and each per-layer statistic (`load_max`, `load_min`, `router_entropy`,
        `dropped`) as an array with one value per layer."""
        x_BTD, totals = self.features(tokens_BT, segment_ids_BT, positions_BT, rng)
        logits_BTV = project(x_BTD, self.head_VD().T, preferred_element_type=jnp.float32)
        return logits_BTV, totals

    def head_VD(self) -> Array:
        """The LM head as [vocab, d_model] in the compute dtype: logits = features @ head.T."""
        dt = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            return self.embed[...].astype(dt)
        return self.lm_head[...].astype(dt).T

    def features(
        self,
        tokens_BT: Array,
        segment_ids_BT: Array | None = None,
        positions_BT: Array | None = None,
        rng: Array | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """The final-normed hidden states that the LM head reads, and the MoE auxiliaries."""
        dt = jnp.dtype(self.cfg.dtype)
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones_like(tokens_BT)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt)
        totals: dict[str, Array] = {}
        per_layer: dict[str, list[Array]] = {}
        call = _block_call(self.cfg.remat)
        for i, block in enumerate(self.layers):
            layer_rng = None if rng is None else jax.random.fold_in(rng, i)
            x_BTD, aux = call(block, x_BTD, segment_ids_BT, positions_BT, layer_rng)
            for name, value in aux.items():
                if name in SUMMED_AUX:
                    totals[name] = totals.get(name, 0.0) + value
                else:
                    per_layer.setdefault(name, []).append(value)
        totals |= {name: jnp.stack(values) for name, values in per_layer.items()}
        return self.final_norm(x_BTD), totals


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Total and active (per-token) parameter counts from the abstract model (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
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
