"""Steady-state train-step time of a config vs its dense twin with the same active FLOPs.

    python scripts/bench_step.py --config configs/tiny.py [--steps 10] [--config.a.b=value ...]

The dense twin replaces the k-of-E expert FFN by one SwiGLU of hidden top_k x ffn_hidden, so the
ratio is the cost of routing and dispatch. Both run in this process, one after the other; the
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from hanuman_jax import sharding
from hanuman_jax.config import ModelConfig, load_config
from hanuman_jax.model.build import train_flops_per_token
from hanuman_jax.training.loop import load_tokenizer
from hanuman_jax.training.step import build_setup, init_state, jit_train_step


def time_steps(cfg, steps: int) -> tuple[float, float]:
    mesh = sharding.make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    state = init_state(setup)
    step = jit_train_step(setup)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    batch = sharding.global_batch(
        {
            "tokens": rng.integers(0, cfg.model.vocab_size, (b, t)).astype(np.int32),
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "loss_mask": np.ones((b, t), np.int32),
        },
        mesh,
    )
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps, compile_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=10)
    args, overrides = p.parse_known_args()
    cfg = load_config(args.config, overrides)
    load_tokenizer(cfg)  # resolves model.vocab_size=0
    moe = cfg.model.moe
    hidden = cfg.model.ffn_hidden * (moe.top_k if moe.num_experts else 1)
    dense = load_config(
        args.config,
        [
            *overrides,
            f"--config.model.vocab_size={cfg.model.vocab_size}",
            "--config.model.moe.num_experts=0",
            f"--config.model.ffn_hidden={hidden}",
        ],
    )
    tokens = cfg.train.batch_size * cfg.data.seq_len
    result = {"config": args.config, "backend": jax.default_backend(), "tokens_per_step": tokens}
    for name, c in (("moe", cfg), ("dense_twin", dense)):
        step_s, compile_s = time_steps(c, args.steps)
        flops = train_flops_per_token(ModelConfig.from_config(c.model), c.data.seq_len) * tokens
        result[name] = {
            "step_ms": round(step_s * 1e3, 1),
            "tokens_per_s": round(tokens / step_s),
            "gflop_s": round(flops / step_s / 1e9, 1),
            "compile_s": round(compile_s, 1),
        }
        print(name, json.dumps(result[name]), flush=True)
    result["ratio_moe_vs_dense"] = round(
        result["moe"]["step_ms"] / result["dense_twin"]["step_ms"], 2
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
