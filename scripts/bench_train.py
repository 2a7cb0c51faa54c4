"""Train-step throughput, FLOP/s and MFU of a config; optionally against the same model in PyTorch.

    python scripts/bench_train.py --config configs/bench_s.py [--steps 10] [--rounds 3]
                                  [--compare-torch] [--config.a.b=value ...]

The real train step (step.jit_train_step: AdamW, clipping, donation) runs on a fixed batch of
random token ids, so any `model.vocab_size` works without a matching tokenizer. Timing starts
after compilation. Each round measures the device's matmul peak, then `--steps` of our step, then
(with --compare-torch) `--steps` of the Hugging Face twin (torch_baseline.py), so load from other
processes hits all three alike; the best round of each is reported. Both frameworks' MFU is taken
against the same measured peak, so `ratio_ceiling` = 1 / torch's MFU bounds the ratio at that
peak: it is the ratio at which ours would run every model FLOP at the measured peak. The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

from hanuman_jax import sharding
from hanuman_jax.config import ConfigError, ModelConfig, load_config
from hanuman_jax.model.build import count_params, train_flops_per_token
from hanuman_jax.planning.memory import lower_train_step, xla_footprint
from hanuman_jax.planning.peaks import matmul_peak, nominal_peak
from hanuman_jax.training.step import build_setup, init_state


def synthetic_batch(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """One document per row of random ids: every position is a trained target."""
    b, t = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, cfg.model.vocab_size, (b, t)).astype(np.int32),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "loss_mask": np.ones((b, t), np.int32),
    }


class JaxTrainer:
    """Our compiled train step on a fixed batch, with its compile time and memory."""

    def __init__(self, cfg, host_batch: dict[str, np.ndarray]):
        mesh = sharding.make_mesh(cfg.mesh)
        self.setup = build_setup(cfg, mesh)
        self.state = init_state(self.setup)
        self.batch = sharding.global_batch(host_batch, mesh)
        start = time.perf_counter()
        self.compiled = lower_train_step(self.setup, self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(metrics)
        self.xla_flops = (self.compiled.cost_analysis() or {}).get("flops")

    def time_steps(self, steps: int) -> float:
        """Seconds per step over `steps` steps; metrics are read once, at the end."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / steps

    def peak_memory(self) -> tuple[int, str]:
        """Bytes at the peak: the allocator's high-water mark where the backend keeps one,
        otherwise (CPU) XLA's compiled footprint of the step."""
        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "device memory_stats peak_bytes_in_use"
        footprint, _ = xla_footprint(self.compiled)
        return int(footprint), "compiled memory_analysis: arguments + outputs - aliased + temp"


def load(config: str, overrides: list[str]):
    """The config, with `model.vocab_size` 0 read from its tokenizer; one line on a bad one."""
    try:
        cfg = load_config(config, overrides)
        if cfg.model.vocab_size == 0:
            from hanuman_jax.training.loop import load_tokenizer

            load_tokenizer(cfg)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    return cfg


def torch_twin(cfg, tokens):
    """The PyTorch twin (scripts/torch_baseline.py), its first-call allocations done."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from torch_baseline import TorchTrainer
    except ImportError as e:
        raise SystemExit(
            f"error: --compare-torch needs torch and transformers ({e}); "
            "pip install 'hanuman-jax[torch]'"
        ) from None
    theirs = TorchTrainer(cfg, tokens)
    theirs.step()
    return theirs


def time_rounds(cfg, ours, theirs, rounds: int, steps: int) -> tuple[list, list, list]:
    """(matmul peaks, our step seconds, torch's) of `rounds` alternating rounds."""
    per_device = jax.device_count()
    peaks, ours_s, theirs_s = [], [], []
    for r in range(rounds):
        peaks.append(matmul_peak(cfg.model.dtype) * per_device)
        ours_s.append(ours.time_steps(steps))
        line = f"round {r + 1}: matmul peak {peaks[-1] / 1e9:,.0f} GFLOP/s; "
        line += f"ours {ours_s[-1] * 1e3:,.1f} ms"
        if theirs is not None:
            theirs_s.append(theirs.time_steps(steps))
            line += f"; torch {theirs_s[-1] * 1e3:,.1f} ms"
        print(line, flush=True)
    return peaks, ours_s, theirs_s


def ours_result(config: str, cfg, ours, ours_s, peaks, memory: int, rss: int) -> dict:
    """Our step's figures: time, FLOP/s, MFU against the measured and the datasheet peak."""
    dev, per_device = jax.devices()[0], jax.device_count()
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops_per_token = train_flops_per_token(ModelConfig.from_config(cfg.model), cfg.data.seq_len)
    step_s, peak = min(ours_s), max(peaks)
    achieved = flops_per_token * tokens / step_s
    nominal = nominal_peak(dev.device_kind, cfg.model.dtype)
    return {
        "config": config,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "devices": per_device,
        "dtype": cfg.model.dtype,
        "tokens_per_step": tokens,
        "step_ms": round(step_s * 1e3, 2),
        "step_ms_median": round(float(np.median(ours_s)) * 1e3, 2),
        "flops_per_token": flops_per_token,
        # XLA's cost analysis counts a loop's body once, not once per trip (the dropless experts'
        # block loop, the chunked loss): a floor, not the step's FLOPs
        "xla_cost_analysis_flops_per_token": ours.xla_flops
        and ours.xla_flops * per_device / tokens,
        "achieved_flop_s": achieved,
        "peak_matmul_flop_s": peak,
        "nominal_peak_flop_s": nominal and nominal * per_device,
        "mfu_nominal_peak": nominal and round(achieved / (nominal * per_device), 4),
        "compile_s": round(ours.compile_s, 2),
        "peak_memory_bytes": memory,
        "process_rss_peak_bytes": rss,
        "tokens_per_s": round(tokens / step_s, 1),
        "mfu_measured_peak": round(achieved / peak, 4),
    }


def torch_result(result: dict, theirs, theirs_s, peaks) -> dict:
    """Torch's figures beside ours in `result`, and the ratio."""
    torch_s, step_s = min(theirs_s), result["step_ms"] / 1e3
    tokens = result["tokens_per_step"]
    torch_mfu = result["flops_per_token"] * tokens / torch_s / max(peaks)
    return {
        "torch_model": type(theirs.model).__name__,
        "torch_experts_implementation": theirs.experts_impl,
        "torch_threads": theirs.threads,
        "torch_step_ms": round(torch_s * 1e3, 2),
        "torch_step_ms_median": round(float(np.median(theirs_s)) * 1e3, 2),
        "torch_tokens_per_s": round(tokens / torch_s, 1),
        "ratio": round(torch_s / step_s, 3),  # ours / torch tokens per second
        "torch_mfu_measured_peak": round(torch_mfu, 4),
        # the ratio if our step ran every model FLOP at the measured matmul peak (MFU 1.0)
        "ratio_ceiling": round(1 / torch_mfu, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    p.add_argument("--compare-torch", action="store_true", help="also time the PyTorch twin")
    args, overrides = p.parse_known_args()
    if args.compare_torch:  # on a GPU, JAX would take 75 % of its memory before torch starts
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cfg = load(args.config, overrides)
    model_cfg = ModelConfig.from_config(cfg.model)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops_per_token = train_flops_per_token(model_cfg, cfg.data.seq_len)
    host_batch = synthetic_batch(cfg, cfg.train.seed)
    counts = count_params(model_cfg)
    print(f"{args.config}: {counts['total']:,} parameters ({counts['active']:,} active), "
          f"{tokens:,} tokens per step, {flops_per_token / 1e6:.1f} MFLOP per token; "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)  # fmt: skip

    ours = JaxTrainer(cfg, host_batch)
    memory, memory_source = ours.peak_memory()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before torch allocates
    print(f"compiled in {ours.compile_s:.1f} s; peak memory {memory / 2**20:,.0f} MiB "
          f"({memory_source}); process RSS peak {rss / 2**20:,.0f} MiB", flush=True)  # fmt: skip
    theirs = torch_twin(cfg, host_batch["tokens"]) if args.compare_torch else None
    peaks, ours_s, theirs_s = time_rounds(cfg, ours, theirs, args.rounds, args.steps)
    result = ours_result(args.config, cfg, ours, ours_s, peaks, memory, rss)
    print(f"ours {result['tokens_per_s']:,.0f} tokens/s, "
          f"{result['achieved_flop_s'] / 1e9:,.1f} GFLOP/s, "
          f"MFU {result['mfu_measured_peak']:.3f} of the measured peak", flush=True)  # fmt: skip
    if theirs is not None:
        result |= torch_result(result, theirs, theirs_s, peaks)
        print(f"torch {result['torch_tokens_per_s']:,.0f} tokens/s, MFU "
              f"{result['torch_mfu_measured_peak']:.3f}; ratio ours/torch {result['ratio']:.2f} "
              f"(at most {result['ratio_ceiling']:.2f}, where our step would run at the "
              "measured peak)", flush=True)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
