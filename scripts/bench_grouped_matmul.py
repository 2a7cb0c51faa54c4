"""Times the MoE expert kernels (forward + backward) against a dense matmul of the same FLOPs.

    python scripts/bench_grouped_matmul.py [--tokens 4096] [--d-model 128] [--hidden 256]
                                           [--experts 4] [--dtype float32]
                                           [--kernels blocked,ragged_dot,auto]

Prints one JSON object per kernel; `ratio_vs_dense` is its time over the dense baseline measured
in the same process (this machine is shared and noisy; ratios are steadier than times), and
`max_out_diff` / `max_grad_diff` its largest output and gradient difference from a float32
reference: each expert's rows through a plain SwiGLU of its own weights. `--kernels` takes
blocked, ragged_dot, gmm and auto (the one `model.moe.grouped_matmul=auto` runs here; each line
says whether it is auto's pick). Off a TPU, gmm runs in Pallas interpret mode (`interpret`: slow,
for tiny shapes).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_attention import max_diff  # this script's folder is on sys.path

from hanuman_jax.model import grouped
from hanuman_jax.model.grouped import grouped_kernel, grouped_swiglu

KERNELS = ("blocked", "ragged_dot", "gmm")


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dtype", default="float32", help="inputs' and weights' dtype")
    p.add_argument("--kernels", default="blocked,ragged_dot,auto",
                   help=f"comma-separated: {', '.join(KERNELS)}, auto")  # fmt: skip
    a = p.parse_args()
    a.kernels = [k for k in a.kernels.split(",") if k]
    unknown = sorted(set(a.kernels) - {*KERNELS, "auto"})
    if unknown:
        p.error(f"--kernels names unknown kernels {unknown}; known: {[*KERNELS, 'auto']}")
    if "gmm" in a.kernels and a.dtype == "float16":
        p.error("--kernels gmm takes --dtype bfloat16 or float32 (megablox has no float16)")
    return a


def inputs(a: argparse.Namespace):
    """Rows, weights, and each row's expert, routed unevenly as a router does: group sizes
    proportional to 1..E, rows sorted by expert (sizes on the host, for the reference)."""
    rows = a.tokens * a.top_k
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (rows, a.d_model))
    wg, wu = (
        jax.random.normal(jax.random.fold_in(key, i), (a.experts, a.d_model, a.hidden)) * 0.05
        for i in (1, 2)
    )
    wd = jax.random.normal(key, (a.experts, a.hidden, a.d_model)) * 0.05
    shares = np.arange(1, a.experts + 1)
    sizes = shares * rows // shares.sum()
    sizes[-1] += rows - sizes.sum()
    expert = jnp.asarray(np.repeat(np.arange(a.experts), sizes), jnp.int32)
    return tuple(w.astype(a.dtype) for w in (x, wg, wu, wd)), expert, sizes


def reference(sizes: np.ndarray):
    """The grouped SwiGLU in float32, one plain SwiGLU per expert on its rows."""

    def swiglu(x, wg, wu, wd):
        parts = jnp.split(x.astype(jnp.float32), np.cumsum(sizes)[:-1])
        w = [a.astype(jnp.float32) for a in (wg, wu, wd)]
        y = [(jax.nn.silu(p @ w[0][e]) * (p @ w[1][e])) @ w[2][e] for e, p in enumerate(parts)]
        return jnp.concatenate(y)

    return swiglu


def fwd_bwd(f):
    """f's output and the gradients of sum(f ** 2) for all four arguments, jitted."""

    def run(*w):
        y, vjp = jax.vjp(f, *w)
        return y, vjp(2 * y)

    return jax.jit(run)


def main() -> None:
    a = parse_args()
    args, expert, sizes = inputs(a)
    platform = jax.default_backend()
    rows = a.tokens * a.top_k
    flops = 3 * 2 * rows * a.d_model * a.hidden * 3  # 3 matmuls, forward + 2x backward

    def dense(x, wg, wu, wd):
        return (jax.nn.silu(x @ wg[0]) * (x @ wu[0])) @ wd[0]

    def line(name: str, t: float, **more) -> None:
        ms, rate = round(t * 1e3, 2), round(flops / t / 1e9, 1)
        print(json.dumps({"kernel": name, "ms": ms, "gflop_s": rate,
                          "ratio_vs_dense": round(t / base, 2), **more}), flush=True)  # fmt: skip

    base = _time(fwd_bwd(dense), *args, repeats=a.repeats)
    line("dense_same_flops", base)
    want = fwd_bwd(reference(sizes))(*args)
    auto = grouped_kernel("auto", a.dtype, platform)
    for impl in dict.fromkeys(auto if k == "auto" else k for k in a.kernels):
        grouped.INTERPRET = impl == "gmm" and platform != "tpu"
        step = fwd_bwd(lambda x, wg, wu, wd, impl=impl: grouped_swiglu(
            x, expert, wg, wu, wd, impl=impl, block_size=a.block_size))  # fmt: skip
        y, grads = step(*args)
        diffs = {"max_out_diff": max_diff(y, want[0]), "max_grad_diff": max_diff(grads, want[1])}
        line(impl, _time(step, *args, repeats=a.repeats), **diffs, auto=impl == auto,
             interpret=grouped.INTERPRET, dtype=a.dtype, backend=platform)  # fmt: skip


if __name__ == "__main__":
    main()
