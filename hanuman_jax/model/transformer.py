"""Decoder-only transformer in flax.nnx: RMSNorm, GQA with RoPE, SwiGLU or MoE feed-forward; one
forward for training, evaluation and decoding (with a KV cache)."""

from __future__ import annotations

import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hanuman_jax.config import ConfigError, ModelConfig, RopeConfig
from hanuman_jax.model.attention import Kernel, blockwise_attention, cudnn_attention, xla_attention
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


class KVCache(typing.NamedTuple):
    """One layer's keys and values at S slots, each slot's segment id (0: padding or not yet
    written) and the first slot that the next tokens are written to."""

    k_BSKH: Array
    v_BSKH: Array
    segment_ids_BS: Array
    slot: Array  # int32 []

    def write(self, k_BTKH: Array, v_BTKH: Array, segment_ids_BT: Array) -> KVCache:
        """The cache with T new tokens at slots slot..slot+T-1."""
        at = (0, self.slot, 0, 0)
        return KVCache(
            jax.lax.dynamic_update_slice(self.k_BSKH, k_BTKH.astype(self.k_BSKH.dtype), at),
            jax.lax.dynamic_update_slice(self.v_BSKH, v_BTKH.astype(self.v_BSKH.dtype), at),
            jax.lax.dynamic_update_slice(
                self.segment_ids_BS, segment_ids_BT.astype(jnp.int32), at[:2]
            ),
            self.slot + k_BTKH.shape[1],
        )


def init_cache(cfg: ModelConfig, batch: int, slots: int) -> list[KVCache]:
    """An empty KV cache of `slots` slots per row, one per layer, in the compute dtype."""
    kv_BSKH = jnp.zeros((batch, slots, cfg.num_kv_heads, cfg.hd), jnp.dtype(cfg.dtype))
    empty = KVCache(kv_BSKH, kv_BSKH, jnp.zeros((batch, slots), jnp.int32), jnp.int32(0))
    return [empty] * cfg.num_layers


class Attention(nnx.Module):
    """Grouped-query causal self-attention; tokens attend only within their packed document.

    `kernel` is the fused attention it runs (resolved from `model.attention` where the model is
    built; None: XLA's). With a KV cache the new tokens attend to the cache's slots, by XLA's
    attention."""

    def __init__(self, cfg: ModelConfig, *, kernel: Kernel | None = None, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.hd
        pdt = jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.wq = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, pdt)
        self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, pdt)
        self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, pdt)
        self.wo = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, pdt)
        self.rope = cfg.rope
        self.dtype = jnp.dtype(cfg.dtype)
        self.requested = cfg.attention
        self.kernel = kernel
        self.block = cfg.attention_block  # 0: the plain attention, all T x T scores at once

    def __call__(
        self,
        x_BTD: Array,
        segment_ids_BT: Array,
        positions_BT: Array,
        cache: KVCache | None = None,
    ) -> tuple[Array, KVCache | None]:
        """The attention's output, and the cache with these tokens written (None without one)."""
        dt = self.dtype
        q_BTNH = project(x_BTD, self.wq[...].astype(dt))
        k_BTKH = project(x_BTD, self.wk[...].astype(dt))
        v_BTKH = project(x_BTD, self.wv[...].astype(dt))
        inv_freq = rope_inv_freq(q_BTNH.shape[-1], self.rope)
        q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
        k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)
        if cache is None:
            out_BTNH = self._attend(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
        else:
            start = cache.slot
            cache = cache.write(k_BTKH, v_BTKH, segment_ids_BT)
            out_BTNH = xla_attention(q_BTNH, cache.k_BSKH, cache.v_BSKH, segment_ids_BT,
                                     cache.segment_ids_BS, start)  # fmt: skip
        return project(out_BTNH, self.wo[...].astype(dt), contract=2), cache

    def _attend(self, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT) -> Array:
        """Attention of the tokens among themselves: the fused kernel, or XLA's attention (in
        blocks of `model.attention_block` query rows when the rows are longer)."""
        t = q_BTNH.shape[1]
        kernel = self.kernel
        if kernel is cudnn_attention and t % 2:  # cuDNN trains a masked attention on even rows
            if self.requested == "cudnn":
                raise ConfigError(
                    f"config model.attention=cudnn cannot run rows of {t} tokens: "
                    "cuDNN needs an even row length (data.seq_len); use auto or xla"
                )
            kernel = None
        if kernel is not None:
            return kernel(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
        if self.block and t > self.block:  # one block would be all the scores
            return blockwise_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, self.block)
        return xla_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)


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
    def __init__(self, cfg: ModelConfig, *, kernel: Kernel | None = None, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(cfg, kernel=kernel, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        if cfg.moe.num_experts:
            self.moe = MoEFeedForward(cfg, rngs=rngs)
        else:
            self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, x_BTD, segment_ids_BT, positions_BT, rng=None, cache=None):
        out_BTD, cache = self.attn(self.attn_norm(x_BTD), segment_ids_BT, positions_BT, cache)
        x_BTD = x_BTD + out_BTD
        h_BTD = self.ffn_norm(x_BTD)
        if hasattr(self, "moe"):
            out_BTD, aux = self.moe(h_BTD, valid_BT=segment_ids_BT != 0, rng=rng)
        else:
            out_BTD, aux = self.mlp(h_BTD), {}
        return x_BTD + out_BTD, aux, cache


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
    """Token embedding, `num_layers` pre-norm blocks, final RMSNorm, LM head (tied or not).
    Built by model/build.py, which resolves the attention `kernel`."""

    def __init__(self, cfg: ModelConfig, *, kernel: Kernel | None = None, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = param(
            rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt
        )
        layers = [Block(cfg, kernel=kernel, rngs=rngs) for _ in range(cfg.num_layers)]
        self.layers = nnx.List(layers)
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
        `dropped`) as an array with one value per layer. By default all tokens are one document."""
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones_like(tokens_BT)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x_BTD, totals, _ = self.features(tokens_BT, segment_ids_BT, positions_BT, rng)
        return self.logits(x_BTD), totals

    def decode(
        self, tokens_BT: Array, segment_ids_BT: Array, positions_BT: Array, cache: list[KVCache]
    ) -> tuple[Array, list[KVCache]]:
        """float32 logits of T new tokens written to the KV cache (one per layer) at its next
        slots, and the updated cache; segment id 0 marks padding."""
        x_BTD, _, cache = self.features(tokens_BT, segment_ids_BT, positions_BT, cache=cache)
        return self.logits(x_BTD), cache

    def logits(self, x_BTD: Array) -> Array:
        """float32 logits of final-normed hidden states (the LM head)."""
        return project(x_BTD, self.head_VD().T, preferred_element_type=jnp.float32)

    def head_VD(self) -> Array:
        """The LM head as [vocab, d_model] in the compute dtype: logits = features @ head.T."""
        dt = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            return self.embed[...].astype(dt)
        return self.lm_head[...].astype(dt).T

    def features(
        self,
        tokens_BT: Array,
        segment_ids_BT: Array,
        positions_BT: Array,
        rng: Array | None = None,
        cache: list[KVCache] | None = None,
    ) -> tuple[Array, dict[str, Array], list[KVCache] | None]:
        """The final-normed hidden states that the LM head reads, the MoE auxiliaries, and the
        updated KV cache (None without one): the forward of training, evaluation and decoding."""
        dt = jnp.dtype(self.cfg.dtype)
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt)
        layer_caches = [None] * len(self.layers) if cache is None else cache
        auxes, new_cache = [], []
        call = _block_call(self.cfg.remat)
        for i, (block, layer_cache) in enumerate(zip(self.layers, layer_caches, strict=True)):
            layer_rng = None if rng is None else jax.random.fold_in(rng, i)
            x_BTD, aux, layer_cache = call(
                block, x_BTD, segment_ids_BT, positions_BT, layer_rng, layer_cache
            )
            auxes.append(aux)
            new_cache.append(layer_cache)
        return self.final_norm(x_BTD), _gather_aux(auxes), None if cache is None else new_cache


def _gather_aux(auxes: list[dict[str, Array]]) -> dict[str, Array]:
    """The layers' MoE auxiliaries: the losses summed, each statistic stacked per layer."""
    totals: dict[str, Array] = {}
    per_layer: dict[str, list[Array]] = {}
    for aux in auxes:
        for name, value in aux.items():
            if name in SUMMED_AUX:
                totals[name] = totals.get(name, 0.0) + value
            else:
                per_layer.setdefault(name, []).append(value)
    return totals | {name: jnp.stack(values) for name, values in per_layer.items()}
