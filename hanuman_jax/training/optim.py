"""AdamW with decoupled weight decay on matrices only, global-norm clipping, warmup + cosine."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to the peak over `warmup_fraction` of the steps, then cosine to the floor."""
    o, steps = cfg.optimizer, cfg.train.steps
    peak = o.peak_lr
    warmup = math.ceil(o.warmup_fraction * steps)
    floor = peak * o.min_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1.0) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        cosine = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params):
    """Weight decay applies to matrices (embeddings, projections, experts), not norms or biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    cfg: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optimizer
    schedule = lr_schedule(cfg)
    adamw = optax.adamw(
        schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
    )
    if o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw), schedule
    return adamw, schedule
