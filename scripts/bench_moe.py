"""One MoE layer, forward + backward, per dispatch mode, against a dense SwiGLU twin.

    python scripts/bench_moe.py --config configs/tiny.py [--tokens 8192] [--repeats 10] \
        [--config.a.b=value ...]

The layer's sizes come from the config (d_model, ffn_hidden, experts, top_k, capacity_factor).
The dense twin is one SwiGLU of hidden top_k x ffn_hidden: the same active parameters and matmul
FLOPs per token, so a ratio is the whole cost of routing and dispatch. All run on the same random
tokens in this process, best of `repeats`. Last line: one JSON object with dropless_vs_dense and
capacity_vs_dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from hanuman_jax.config import ModelConfig, load_config
from hanuman_jax.model import FeedForward
from hanuman_jax.moe import MoEFeedForward


def _timed(module, x, valid, repeats: int) -> float:
    graphdef, params = nnx.split(module, nnx.Param)

    def loss(params, x):
        m = nnx.merge(graphdef, params)
        out = m(x, valid_BT=valid) if isinstance(m, MoEFeedForward) else m(x)
        y, aux = out if isinstance(out, tuple) else (out, {})
        return jnp.sum(jnp.square(y)) + sum(v for k, v in aux.items() if k == "aux_loss")

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(step(params, x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per call (batch x seq)")
    p.add_argument("--repeats", type=int, default=10)
    a, overrides = p.parse_known_args()
    cfg = load_config(a.config, overrides)
    with cfg.model.unlocked():
        cfg.model.vocab_size = cfg.model.vocab_size or 8
    model_cfg = ModelConfig.from_config(cfg.model)
    moe = model_cfg.moe
    if not moe.num_experts:
        raise SystemExit("the config's model is dense: nothing to compare")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, a.tokens, model_cfg.d_model))
    x = x.astype(model_cfg.dtype)
    valid = jnp.ones((1, a.tokens), bool)
    dense_cfg = dataclasses.replace(model_cfg, ffn_hidden=moe.top_k * model_cfg.ffn_hidden)
    dense_s = _timed(FeedForward(dense_cfg, rngs=nnx.Rngs(0)), x, valid, a.repeats)
    result = {"config": a.config, "overrides": overrides, "tokens": a.tokens,
              "experts": moe.num_experts, "top_k": moe.top_k, "d_model": model_cfg.d_model,
              "ffn_hidden": model_cfg.ffn_hidden, "backend": jax.default_backend(),
              "dense_ms": round(dense_s * 1e3, 2)}  # fmt: skip
    for dispatch in ("dropless", "capacity"):
        layer_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(moe, dispatch=dispatch))
        seconds = _timed(MoEFeedForward(layer_cfg, rngs=nnx.Rngs(0)), x, valid, a.repeats)
        result[f"{dispatch}_ms"] = round(seconds * 1e3, 2)
        result[f"{dispatch}_vs_dense"] = round(seconds / dense_s, 3)
        print(f"{dispatch}: {seconds * 1e3:.2f} ms, {seconds / dense_s:.3f}x dense "
              f"({dense_s * 1e3:.2f} ms)", flush=True)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
