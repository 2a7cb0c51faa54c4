"""Times the MoE expert kernels (forward + backward) against a dense matmul of the same FLOPs.

    python scripts/bench_grouped_matmul.py [--tokens 4096] [--d-model 128] [--hidden 256]
                                           [--experts 4] [--dtype float32]

Prints one JSON object per kernel; `ratio_vs_dense` is its time over the dense baseline measured
in the same process (this machine is shared and noisy; ratios are steadier than times), and
`max_grad_diff` its largest gradient difference from the `blocked` kernel's.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from hanuman_jax.model.grouped import grouped_swiglu


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dtype", default="float32", help="inputs' and weights' dtype")
    a = p.parse_args()
    rows = a.tokens * a.top_k
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (rows, a.d_model))
    wg, wu = (
        jax.random.normal(jax.random.fold_in(key, i), (a.experts, a.d_model, a.hidden)) * 0.05
        for i in (1, 2)
    )
    wd = jax.random.normal(key, (a.experts, a.hidden, a.d_model)) * 0.05
    x, wg, wu, wd = (w.astype(a.dtype) for w in (x, wg, wu, wd))
    # uneven routing, as a router produces: group sizes proportional to 1..E
    shares = jnp.arange(1, a.experts + 1)
    sizes = (shares * rows // shares.sum()).astype(jnp.int32)
    sizes = sizes.at[-1].add(rows - sizes.sum())
    expert = jnp.repeat(jnp.arange(a.experts), sizes, total_repeat_length=rows)

    def dense(x, wg, wu, wd):
        return (jax.nn.silu(x @ wg[0]) * (x @ wu[0])) @ wd[0]

    def kernel(impl):
        return lambda x, wg, wu, wd: grouped_swiglu(
            x, expert, wg, wu, wd, impl=impl, block_size=a.block_size
        )

    def fwd_bwd(f):
        return jax.jit(jax.grad(lambda *w: jnp.sum(jnp.square(f(*w))), argnums=(0, 1, 2, 3)))

    base = _time(fwd_bwd(dense), x, wg, wu, wd, repeats=a.repeats)
    flops = 3 * 2 * rows * a.d_model * a.hidden * 3  # 3 matmuls, forward + 2x backward
    print(
        json.dumps(
            {
                "kernel": "dense_same_flops",
                "ms": round(base * 1e3, 2),
                "gflop_s": round(flops / base / 1e9, 1),
                "ratio_vs_dense": 1.0,
            }
        )
    )
    grads = {}
    for impl in ("blocked", "ragged_dot"):
        step = fwd_bwd(kernel(impl))
        grads[impl] = step(x, wg, wu, wd)
        diff = max(
            float(jnp.max(jnp.abs(g.astype(jnp.float32) - want.astype(jnp.float32))))
            for g, want in zip(grads[impl], grads["blocked"], strict=True)
        )
        t = _time(step, x, wg, wu, wd, repeats=a.repeats)
        print(
            json.dumps(
                {
                    "kernel": impl,
                    "ms": round(t * 1e3, 2),
                    "gflop_s": round(flops / t / 1e9, 1),
                    "ratio_vs_dense": round(t / base, 2),
                    "max_grad_diff": diff,
                    "dtype": a.dtype,
                    "backend": jax.default_backend(),
                }
            )
        )


if __name__ == "__main__":
    main()
