"""AdamW with decoupled weight decay on matrices only, global-norm clipping, warmup + cosine."""

from __future__ import annotations

import math

import jax
import ml_collections
import optax


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup over `warmup_fraction` of the steps, from peak / warmup at step 0 to the peak
    at the warmup's last step, then cosine from the peak to `min_lr_ratio` x peak at the end."""
    o, steps = cfg.optimizer, cfg.train.steps
    warmup = math.ceil(o.warmup_fraction * steps)
    cosine = optax.cosine_decay_schedule(o.peak_lr, max(steps - warmup, 1), alpha=o.min_lr_ratio)
    if warmup == 0:
        return cosine
    warm = optax.linear_schedule(o.peak_lr / warmup, o.peak_lr, warmup - 1)
    return optax.join_schedules([warm, cosine], [warmup])


def decay_mask(params):
    """Weight decay applies to matrices (embeddings, projections, experts), not norms or biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    cfg: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of the `optimizer` section, and its learning-rate schedule."""
    o = cfg.optimizer
    schedule = lr_schedule(cfg)
    adamw = optax.adamw(
        schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
    )
    if o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw), schedule
    return adamw, schedule
