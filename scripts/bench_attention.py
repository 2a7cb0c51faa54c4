"""XLA's attention, all scores at once against `blockwise_attention` (and, on a GPU, cuDNN flash
attention): forward + backward time and XLA's temporaries, on one shape, in one process.

    python scripts/bench_attention.py [--batch 2] [--seq 2048] [--heads 4] [--kv-heads 2]
                                      [--head-dim 64] [--blocks 128,256,512] [--rounds 3]
                                      [--dtype float32]

Every variant's gradients are checked against the plain attention's first. Rounds alternate the
variants; the best round of each is reported. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from hanuman_jax.model.attention import blockwise_attention, fused_attention, xla_attention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--blocks", default="128,256,512", help="query rows per block, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    b, t, n, kv, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h)).astype(args.dtype)
    k = jax.random.normal(keys[1], (b, t, kv, h)).astype(args.dtype)
    v = jax.random.normal(keys[2], (b, t, kv, h)).astype(args.dtype)
    dout = jax.random.normal(keys[3], q.shape).astype(args.dtype)
    # two packed documents per row
    seg = jnp.concatenate([jnp.ones((b, t // 2), jnp.int32), jnp.full((b, t - t // 2), 2)], 1)

    def fwd_bwd(attend):
        def f(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg), q, k, v)
            return out, vjp(dout)

        return jax.jit(f)

    variants = {"all": fwd_bwd(xla_attention)}
    for block in map(int, args.blocks.split(",")):
        variants[f"block_{block}"] = fwd_bwd(
            lambda q, k, v, seg, block=block: blockwise_attention(q, k, v, seg, block)
        )
    if jax.default_backend() == "gpu":  # what model.attention=auto runs there
        variants["cudnn"] = fwd_bwd(lambda q, k, v, seg: fused_attention(q, k, v, seg, "cudnn"))
    temp, err = {}, {}
    _, want = variants["all"](q, k, v)
    for name, f in variants.items():
        temp[name] = f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
        _, got = f(q, k, v)
        err[name] = max(float(jnp.max(jnp.abs(a - w))) for a, w in zip(got, want, strict=True))
    best = dict.fromkeys(variants, float("inf"))
    for r in range(args.rounds):
        line = []
        for name, f in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(f(q, k, v))
            best[name] = min(best[name], time.perf_counter() - start)
            line.append(f"{name} {best[name] * 1e3:,.1f} ms")
        print(f"round {r + 1}: " + ", ".join(line), flush=True)
    for name in variants:
        print(f"{name}: {best[name] * 1e3:,.1f} ms, XLA temporaries {temp[name] / 2**20:,.0f} MiB, "
              f"max gradient difference {err[name]:.2e}")  # fmt: skip
    result = {
        "shape": {"batch": b, "seq": t, "heads": n, "kv_heads": kv, "head_dim": h},
        "dtype": args.dtype,
        "backend": jax.default_backend(),
        "ms": {k: round(s * 1e3, 2) for k, s in best.items()},
        "temp_bytes": temp,
        "max_grad_diff": err,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
