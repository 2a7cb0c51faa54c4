"""Input pipeline throughput vs the trainer's appetite for the same config.

    python scripts/bench_data.py --config configs/tiny.py [--batches 300] [--steps 10] \
        [--config.a.b=value ...]

Pipeline: raw files -> documents -> tokens -> token-weighted mixture -> packed batches, on one
thread and without prefetching (what the training process's prefetch thread does). Trainer: the
jitted train step on a batch from that pipeline, after compilation. Both in this process, one
after the other; the last line is one JSON object with pipeline_tokens_per_s, train_tokens_per_s
and ratio (target >= 10: the pipeline must never be what the trainer waits for).
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from hanuman_jax import sharding
from hanuman_jax.config import load_config
from hanuman_jax.data import make_dataset
from hanuman_jax.training.loop import load_tokenizer
from hanuman_jax.training.step import build_setup, init_state, jit_train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--batches", type=int, default=300, help="pipeline batches timed")
    p.add_argument("--steps", type=int, default=10, help="train steps timed")
    a, overrides = p.parse_known_args()
    cfg = load_config(a.config, overrides)
    tokenizer = load_tokenizer(cfg)
    tokens_per_batch = cfg.train.batch_size * cfg.data.seq_len

    start = time.perf_counter()
    it = iter(make_dataset(cfg, tokenizer.path, prefetch=0))
    first = next(it)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(a.batches):
        last = next(it)
    pipeline_s = time.perf_counter() - start
    pipeline_tps = a.batches * tokens_per_batch / pipeline_s
    stats = last["stats"]
    placed = stats["source_tokens"].sum()
    print(f"pipeline: {pipeline_tps:,.0f} tokens/s over {a.batches} batches "
          f"(sources opened and first batch in {open_s:.2f} s)", flush=True)  # fmt: skip

    mesh = sharding.make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    state = init_state(setup)
    step = jit_train_step(setup)
    first.pop("stats")
    batch = sharding.global_batch(first, mesh)
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(a.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    train_tps = a.steps * tokens_per_batch / (time.perf_counter() - start)
    print(f"trainer:  {train_tps:,.0f} tokens/s over {a.steps} steps", flush=True)
    print(json.dumps({
        "config": a.config,
        "overrides": overrides,
        "tokens_per_batch": tokens_per_batch,
        "pipeline_tokens_per_s": round(pipeline_tps),
        "train_tokens_per_s": round(train_tps),
        "ratio": round(pipeline_tps / train_tps, 2),
        "open_and_first_batch_s": round(open_s, 3),
        "source_token_shares": [round(float(x) / float(placed), 4) for x in stats["source_tokens"]],
        "padding_share": round(float(stats["padding"]) / (placed + stats["padding"]), 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
