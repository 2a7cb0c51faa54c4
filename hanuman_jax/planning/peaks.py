"""Peak matmul FLOP/s of a device: nominal (datasheets) and measured (one big jitted matmul)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

T = 1e12
# (substring of jax.Device.device_kind, {compute dtype: dense FLOP/s per JAX device}), first match
# wins, so more specific names come first. No sparsity figures. Sources:
# - T4: NVIDIA T4 datasheet: 65 TFLOPS fp16 tensor cores, 8.1 TFLOPS fp32. Turing has no bf16
#   units, so XLA computes bf16 matmuls in fp32.
# - A100: NVIDIA A100 datasheet: 312 TFLOPS bf16/fp16, 156 TFLOPS TF32. JAX's default matmul
#   precision runs fp32 dots as TF32 on Ampere and later, so fp32 is the TF32 figure.
# - H100: NVIDIA H100 datasheet: SXM 989 TFLOPS bf16/fp16, 495 TF32; PCIe 756 and 378.
#   H200 (datasheet): the H100 SXM compute with more memory.
# - TPU: Google Cloud TPU system architecture pages, per chip: v2 45, v3 123 (two TensorCores,
#   each one JAX device, so half each), v4 275, v5e 197, v5p 459, v6e (Trillium) 918 TFLOPS bf16.
#   The MXU multiplies in bf16 and JAX's default precision gives fp32 dots one bf16 pass, so
#   every dtype gets the bf16 figure.
NOMINAL: tuple[tuple[str, dict[str, float]], ...] = (
    ("T4", {"float16": 65 * T, "bfloat16": 8.1 * T, "float32": 8.1 * T}),
    ("A100", {"float16": 312 * T, "bfloat16": 312 * T, "float32": 156 * T}),
    ("H100 PCIe", {"float16": 756 * T, "bfloat16": 756 * T, "float32": 378 * T}),
    ("H100", {"float16": 989 * T, "bfloat16": 989 * T, "float32": 495 * T}),
    ("H200", {"float16": 989 * T, "bfloat16": 989 * T, "float32": 495 * T}),
    ("TPU v2", dict.fromkeys(("float16", "bfloat16", "float32"), 22.5 * T)),
    ("TPU v3", dict.fromkeys(("float16", "bfloat16", "float32"), 61.5 * T)),
    ("TPU v4", dict.fromkeys(("float16", "bfloat16", "float32"), 275 * T)),
    ("TPU v5 lite", dict.fromkeys(("float16", "bfloat16", "float32"), 197 * T)),
    ("TPU v5e", dict.fromkeys(("float16", "bfloat16", "float32"), 197 * T)),
    ("TPU v5", dict.fromkeys(("float16", "bfloat16", "float32"), 459 * T)),  # v5p
    ("TPU v6", dict.fromkeys(("float16", "bfloat16", "float32"), 918 * T)),  # v6e, "v6 lite"
)


def nominal_peak(device_kind: str, dtype: str) -> float | None:
    """Datasheet dense matmul FLOP/s of one device in `dtype`; None where the table has none
    (CPUs, unlisted accelerators)."""
    for name, peaks in NOMINAL:
        if name.lower() in device_kind.lower():
            return peaks[dtype]
    return None


def matmul_peak(dtype: str, n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` n x n matmuls in `dtype` on the default device; n is
    2048 on CPU and 8192 elsewhere."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    ka, kb = jax.random.split(jax.random.key(0))
    a_NN = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b_NN = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a_NN, b_NN).block_until_ready()
    # On accelerators one matmul is too short to time alone: time `burst` queued ones.
    burst = 1 if jax.default_backend() == "cpu" else 20
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(burst):
            out = matmul(a_NN, b_NN)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / burst)
    return 2 * n**3 / best
