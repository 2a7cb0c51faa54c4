"""The mesh section, and the one rule for how the batch splits over the mesh and micro-batches.

This module imports no jax, so that loading a config stays fast; `sharding.py` builds the mesh.
"""

from __future__ import annotations

import dataclasses
import math

from hanuman_jax.config.fields import ConfigError, Section, check

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# the axes a batch's rows are split over (sharding.LOGICAL_RULES["batch"]): outside the MoE layers
# the expert axis is one more data-parallel axis
BATCH_AXES = ("data", "fsdp", "expert")


def check_batch_divides(batch_size: int, grad_accum_steps: int, shards: int, where: str) -> None:
    """Checks that `batch_size` rows split into `shards` equal parts (`where` says what splits
    them), and each part into `grad_accum_steps` micro-batches."""
    if batch_size % shards:
        raise ConfigError(
            f"config train.batch_size={batch_size} is invalid: it is split {shards} ways by "
            f"{where}; use a multiple of {shards}"
        )
    rows = batch_size // shards
    if rows % grad_accum_steps:
        of = (
            f"train.batch_size ({batch_size})"
            if shards == 1
            else f"the {rows} rows of each of the {shards} batch shards ({where})"
        )
        raise ConfigError(
            f"config train.grad_accum_steps={grad_accum_steps} is invalid: must divide {of}; "
            f"use a train.batch_size that is a multiple of {shards * grad_accum_steps}"
        )


class _AxisSize:
    """A mesh axis: devices along it, or -1 for those the other axes leave."""

    def problem(self, value: object) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1)
        return None if ok else "must be >= 1, or -1 for 'all remaining devices'"


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """Devices along each mesh axis; one axis may be -1: all the devices the others leave."""

    PREFIX = "mesh"
    RULES = dict.fromkeys(MESH_AXES, _AxisSize())

    data: int
    fsdp: int
    expert: int
    tensor: int

    def check_fields(self) -> None:
        sizes = self.sizes()
        check(list(sizes.values()).count(-1) <= 1, "mesh", sizes, "at most one axis may be -1")

    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def batch_split(self) -> tuple[int, str]:
        """The ways the batch axes set in the config split a batch (a -1 axis splits it further),
        and what they are, for messages."""
        fixed = {a: getattr(self, a) for a in BATCH_AXES if getattr(self, a) != -1}
        where = " x ".join(f"mesh.{a}={v}" for a, v in fixed.items())
        return math.prod(fixed.values()), where
