"""One MoE layer, forward + backward, per dispatch mode, against a dense SwiGLU twin.

    python scripts/bench_moe.py --config configs/tiny.py [--tokens 8192] [--repeats 10] \
        [--config.a.b=value ...]

The layer's sizes come from the config (d_model, ffn_hidden, experts, top_k, capacity_factor).
The dense twin is one SwiGLU of hidden top_k x ffn_hidden: the same active parameters and matmul
FLOPs per token, so a ratio is the whole cost of routing and dispatch. All run on the same random
tokens in this process,
best of `repeats` interleaved rounds. Last line: one JSON object with dropless_vs_dense and
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
from hanuman_jax.model.moe import MoEFeedForward
from hanuman_jax.model.transformer import FeedForward


def _compiled(module, x, valid):
    """The jitted forward + backward of `module` (gradients for its parameters and input)."""
    graphdef, params = nnx.split(module, nnx.Param)

    def loss(params, x):
        m = nnx.merge(graphdef, params)
        out = m(x, valid_BT=valid) if isinstance(m, MoEFeedForward) else m(x)
        y, aux = out if isinstance(out, tuple) else (out, {})
        return jnp.sum(jnp.square(y)) + sum(v for k, v in aux.items() if k == "aux_loss")

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(step(params, x))
    return lambda: jax.block_until_ready(step(params, x))


def _best_interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Best time of each, measured round-robin so that a noisy spell hits all of them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per call (batch x seq)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
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
    fns = {"dense": _compiled(FeedForward(dense_cfg, rngs=nnx.Rngs(0)), x, valid)}
    for dispatch in ("dropless", "capacity"):
        layer_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(moe, dispatch=dispatch))
        fns[dispatch] = _compiled(MoEFeedForward(layer_cfg, rngs=nnx.Rngs(0)), x, valid)
    best = _best_interleaved(fns, a.repeats)
    result = {"config": a.config, "overrides": overrides, "tokens": a.tokens,
              "experts": moe.num_experts, "top_k": moe.top_k, "d_model": model_cfg.d_model,
              "ffn_hidden": model_cfg.ffn_hidden, "capacity_factor": moe.capacity_factor,
              "backend": jax.default_backend()}  # fmt: skip
    for name, seconds in best.items():
        result[f"{name}_ms"] = round(seconds * 1e3, 2)
        if name != "dense":
            result[f"{name}_vs_dense"] = round(seconds / best["dense"], 3)
            print(f"{name}: {seconds * 1e3:.2f} ms, {seconds / best['dense']:.3f}x dense "
                  f"({best['dense'] * 1e3:.2f} ms)", flush=True)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
