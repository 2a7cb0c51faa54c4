"""The device a run is planned for, and which attention kernel `model.attention` means there.

Setups resolve `model.attention` once, for a `Target` their caller names: training for its
mesh's devices, generation and evaluation for this process's, the memory planner for the device
it plans for (`python -m hanuman_jax.memory --device h100` on a CPU)."""

from __future__ import annotations

import typing

import jax

from hanuman_jax.config import ConfigError, ModelConfig
from hanuman_jax.model.attention import Kernel, cudnn_attention, splash_kernel
from hanuman_jax.model.grouped import grouped_kernel


class Target(typing.NamedTuple):
    """What decides the attention kernel: the platform and, on NVIDIA GPUs, compute capability."""

    platform: str  # cpu, gpu or tpu
    capability: float = 0.0  # CUDA compute capability (a T4 is 7.5, an A100 8.0, an H100 9.0)


def device_target(device: jax.Device) -> Target:
    """The target `device` is."""
    return Target(device.platform, float(getattr(device, "compute_capability", 0) or 0))


def local_target() -> Target:
    """This process's first device."""
    return device_target(jax.devices()[0])


def resolve_attention(requested: str, dtype: str, head_dim: int, target: Target) -> str:
    """`model.attention` resolved on `target` ('xla', 'cudnn' or 'splash'): auto takes Pallas
    splash attention on a TPU, cuDNN flash attention where it runs (an NVIDIA GPU of compute
    capability 8.0 or more, bf16/fp16, head_dim a multiple of 8 up to 128; a T4 is 7.5) and XLA's
    attention otherwise."""
    fits = dtype in ("bfloat16", "float16") and head_dim % 8 == 0 and head_dim <= 128
    runs = target.platform == "gpu" and target.capability >= 8.0 and fits
    if requested == "cudnn" and not runs:
        raise ConfigError(
            f"config model.attention=cudnn cannot run here ({target.platform}, capability "
            f"{target.capability:g}, model.dtype={dtype}, head_dim {head_dim}): it needs an NVIDIA "
            "GPU of compute capability 8.0+, bfloat16 or float16 and head_dim a multiple of 8 up "
            "to 128; use auto or xla"
        )
    if requested == "splash" and target.platform != "tpu":
        raise ConfigError(
            f"config model.attention=splash cannot run here ({target.platform}): Pallas splash "
            "attention is a TPU kernel; use auto or xla"
        )
    if requested == "auto":
        return "splash" if target.platform == "tpu" else "cudnn" if runs else "xla"
    return requested


def attention_kernel(cfg: ModelConfig, target: Target) -> Kernel | None:
    """The fused attention kernel that `model.attention` means on `target` (None: XLA's); a
    ConfigError where cudnn or splash is asked for and `target` cannot run it."""
    name = resolve_attention(cfg.attention, cfg.dtype, cfg.hd, target)
    if name == "splash":
        return splash_kernel(cfg.attention_block, strict=cfg.attention == "splash")
    return cudnn_attention if name == "cudnn" else None


def grouped_matmul_impl(cfg: ModelConfig, target: Target, *, expert_parallel: bool = False) -> str:
    """The expert kernel `model.moe.grouped_matmul` means on `target` (blocked, ragged_dot or
    gmm), `expert_parallel` where a mesh splits the experts; a ConfigError where an MoE model
    names one that cannot run there."""
    moe = cfg.moe
    return grouped_kernel(moe.grouped_matmul, cfg.dtype, target.platform,
                          expert_parallel=expert_parallel, strict=moe.num_experts > 0)  # fmt: skip
