"""How well a run uses its devices: MFU against their datasheet peak, and their peak memory.

Both go into each metrics row (`mfu`, `peak_memory_gib`, `memory_fraction`), TensorBoard and the
progress bar, where the backend tells: MFU needs a device listed in `planning/peaks.py` (not a
CPU), memory needs `Device.memory_stats()` (GPU and TPU; a CPU has none)."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from hanuman_jax.config import ModelConfig
from hanuman_jax.model.build import train_flops_per_token
from hanuman_jax.planning.peaks import nominal_peak

GiB = 1 << 30


def devices_peak(devices: Sequence[jax.Device], dtype: str) -> float | None:
    """The summed datasheet matmul FLOP/s of `devices` in `dtype`; None if one is not listed."""
    peaks = [nominal_peak(d.device_kind, dtype) for d in devices]
    return None if not peaks or None in peaks else float(sum(peaks))


def memory_peak(devices: Sequence[jax.Device]) -> tuple[int, int] | None:
    """(peak bytes in use, bytes limit) of the fullest of `devices` since the process started;
    None where the backend keeps no memory statistics."""
    fullest = None
    for device in devices:
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            pair = (int(stats["peak_bytes_in_use"]), int(stats.get("bytes_limit", 0)))
            fullest = pair if fullest is None or pair[0] > fullest[0] else fullest
    return fullest


class Utilization:
    """The utilisation figures of one metrics row of a run of `model` on a mesh of `devices`;
    memory is read from the devices of this process (the one that writes the row)."""

    def __init__(self, model: ModelConfig, devices: Sequence[jax.Device]):
        self.model = model
        self.peak = devices_peak(devices, model.dtype)
        self.local = [d for d in devices if d.process_index == jax.process_index()]

    def row(self, tokens_per_s: float, seq_len: int) -> dict[str, float]:
        """`mfu` (model FLOPs per second over the mesh's peak, PaLM's count of the FLOPs at the
        step's row length), `peak_memory_gib` and `memory_fraction` (of the device's limit):
        those the backend can tell."""
        out = {}
        if self.peak:
            out["mfu"] = tokens_per_s * train_flops_per_token(self.model, seq_len) / self.peak
        memory = memory_peak(self.local)
        if memory:
            out["peak_memory_gib"] = memory[0] / GiB
            if memory[1]:
                out["memory_fraction"] = memory[0] / memory[1]
        return out
