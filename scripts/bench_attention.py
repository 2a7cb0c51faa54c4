"""XLA's attention, all scores at once, against `blockwise_attention` and the fused kernels
(cuDNN flash attention, Pallas splash attention): forward + backward time, XLA's temporaries, and
each variant's largest output and gradient difference from the plain attention's, on one shape, in
one process.

    python scripts/bench_attention.py [--batch 2] [--seq 2048] [--heads 4] [--kv-heads 2]
                                      [--head-dim 64] [--blocks 128,256,512] [--rounds 3]
                                      [--dtype float32] [--kernels auto]

`--kernels` names the fused kernels to add: cudnn, splash, or auto (the one `model.attention=auto`
runs here: cuDNN on an NVIDIA GPU of compute capability 8.0+, splash on a TPU, none elsewhere).
One this device cannot run is skipped, with the reason in `skipped`; off a TPU, splash runs in
Pallas interpret mode (listed in `interpret`; slow, for tiny shapes). Rounds alternate the
variants; the best round of each is reported. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp

from hanuman_jax.config import ConfigError
from hanuman_jax.model.attention import (
    blockwise_attention,
    cudnn_attention,
    splash_attention,
    splash_block,
    xla_attention,
)
from hanuman_jax.planning.targets import local_target, resolve_attention

FUSED = ("cudnn", "splash")


def fused_kernels(names: list[str], dtype: str, head_dim: int, seq: int):
    """The fused kernels of `names` (auto resolved) that run here, by name; those that cannot,
    with the reason; and those that run in Pallas interpret mode."""
    target = local_target()
    auto = resolve_attention("auto", dtype, head_dim, target)
    kernels, skipped, interpret = {}, {}, []
    for name in (auto if n == "auto" else n for n in names):
        if name == "xla" or name in kernels:
            continue
        if name == "splash" and not splash_block(seq):
            skipped[name] = f"rows of {seq} tokens: splash attention tiles multiples of 128"
        elif name == "splash":
            off_tpu = target.platform != "tpu"
            kernels[name] = functools.partial(splash_attention, interpret=off_tpu)
            interpret += [name] if off_tpu else []
        else:
            try:
                resolve_attention(name, dtype, head_dim, target)
                kernels[name] = cudnn_attention
            except ConfigError as e:
                skipped[name] = str(e)
    return kernels, skipped, interpret


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--blocks", default="128,256,512", help="query rows per block, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--kernels", default="auto", help=f"fused kernels, comma-separated: {FUSED}, auto"
    )
    args = p.parse_args()
    args.kernels = [k for k in args.kernels.split(",") if k]
    unknown = sorted(set(args.kernels) - {*FUSED, "auto"})
    if unknown:
        p.error(f"--kernels names unknown kernels {unknown}; known: {[*FUSED, 'auto']}")
    return args


def variants(args: argparse.Namespace, kernels: dict) -> dict:
    """Each variant's jitted forward + backward: (q, k, v, dout) -> (out, (dq, dk, dv)), on two
    packed documents per row."""
    b, t = args.batch, args.seq
    seg = jnp.concatenate([jnp.ones((b, t // 2), jnp.int32), jnp.full((b, t - t // 2), 2)], 1)

    def fwd_bwd(attend):
        def f(q, k, v, dout):
            out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg), q, k, v)
            return out, vjp(dout)

        return jax.jit(f)

    found = {"all": fwd_bwd(xla_attention)}
    for block in map(int, args.blocks.split(",")):
        found[f"block_{block}"] = fwd_bwd(
            lambda q, k, v, seg, block=block: blockwise_attention(q, k, v, seg, block)
        )
    return found | {name: fwd_bwd(kernel) for name, kernel in kernels.items()}


def max_diff(got, want) -> float:
    """The largest absolute difference between two trees of arrays, in float32."""
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    f32 = jnp.float32
    return max(float(jnp.max(jnp.abs(g.astype(f32) - w.astype(f32)))) for g, w in pairs)


def best_times(found: dict, inputs: tuple, rounds: int) -> dict[str, float]:
    """Each variant's best seconds over `rounds` rounds that alternate the variants."""
    best = dict.fromkeys(found, float("inf"))
    for r in range(rounds):
        line = []
        for name, f in found.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*inputs))
            best[name] = min(best[name], time.perf_counter() - start)
            line.append(f"{name} {best[name] * 1e3:,.1f} ms")
        print(f"round {r + 1}: " + ", ".join(line), flush=True)
    return best


def main() -> None:
    args = parse_args()
    b, t, n, kv, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = [(b, t, n, h), (b, t, kv, h), (b, t, kv, h), (b, t, n, h)]  # q, k, v, dout
    inputs = tuple(
        jax.random.normal(key, s).astype(args.dtype) for key, s in zip(keys, shapes, strict=True)
    )
    kernels, skipped, interpret = fused_kernels(args.kernels, args.dtype, h, t)
    found = variants(args, kernels)
    temp, out_err, grad_err = {}, {}, {}
    want_out, want_grads = found["all"](*inputs)
    for name, f in found.items():
        temp[name] = f.lower(*inputs).compile().memory_analysis().temp_size_in_bytes
        out, grads = f(*inputs)
        out_err[name], grad_err[name] = max_diff(out, want_out), max_diff(grads, want_grads)
    best = best_times(found, inputs, args.rounds)
    for name in found:
        diffs = f"output {out_err[name]:.2e}, gradients {grad_err[name]:.2e}"
        print(f"{name}: {best[name] * 1e3:,.1f} ms, XLA temporaries {temp[name] / 2**20:,.0f} MiB, "
              f"max difference from all: {diffs}")  # fmt: skip
    for name, why in skipped.items():
        print(f"{name}: skipped: {why}")
    result = {
        "shape": {"batch": b, "seq": t, "heads": n, "kv_heads": kv, "head_dim": h},
        "dtype": args.dtype,
        "backend": jax.default_backend(),
        "ms": {k: round(s * 1e3, 2) for k, s in best.items()},
        "temp_bytes": temp,
        "max_out_diff": out_err,
        "max_grad_diff": grad_err,
        "skipped": skipped,
        "interpret": interpret,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
