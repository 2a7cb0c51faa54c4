"""Parameter creation and normalisation shared by the dense and MoE layers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    """A normal(0, std) parameter tagged with logical axis names.

    Eager sharding is off: `sharding.py` maps the names to the mesh when the state is created.
    """
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def project(x: Array, w: Array, contract: int = 1, preferred_element_type=None) -> Array:
    """Contracts the last `contract` axes of x with the first `contract` axes of w, as one 2-D
    matmul: XLA:CPU runs the backward of the equivalent 3-D einsum ("BTD,DF->BTF") slower
    (BENCHMARKS.md); on GPU and TPU the two are the same."""
    lead, inner = x.shape[: x.ndim - contract], w.shape[:contract]
    k = math.prod(inner)
    y = jnp.matmul(
        x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type
    )
    return y.reshape(*lead, *w.shape[contract:])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(
            jnp.ones((dim,), param_dtype), out_sharding=("embed",), eager_sharding=False
        )

    def __call__(self, x_BTD: Array) -> Array:
        x32 = x_BTD.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x_BTD.dtype) * y.astype(x_BTD.dtype)


def group_ranks(group_R: Array, num_groups: int, counted_R: Array | None = None) -> Array:
    """Each row's rank among the earlier rows of its group (0, 1, ...). Rows where `counted_R` is
    False do not take a rank from the rows after them."""
    onehot_RE = jax.nn.one_hot(group_R, num_groups, dtype=jnp.int32)
    if counted_R is not None:
        onehot_RE = onehot_RE * counted_R[:, None].astype(jnp.int32)
    return jnp.take_along_axis(jnp.cumsum(onehot_RE, axis=0), group_R[:, None], axis=1)[:, 0] - 1
