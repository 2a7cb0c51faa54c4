"""The device mesh and the one table that maps logical axis names to mesh axes."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from hanuman_jax.config import BATCH_AXES, MESH_AXES, ConfigError

# Logical axis -> mesh axes. Parameters (and so the optimizer state) are sharded over `fsdp`
# (ZeRO-3), experts over `expert`, heads and FFN hidden over `tensor`; the batch of activations over
# (`data`, `fsdp`, `expert`): outside the MoE layers the expert axis is one more data-parallel axis.
# Nothing outside this module names a mesh axis, but config/mesh.py (jax-free, for config checks).
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
}


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves a -1 axis and checks that the axes multiply to the device count."""
    sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for axis, v in sizes.items():
        if v == -1:
            if num_devices % fixed:
                raise ConfigError(
                    f"config mesh.{axis}=-1 is invalid: the other axes ({fixed}) do not divide "
                    f"the {num_devices} devices"
                )
            sizes[axis] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"config mesh={sizes} is invalid: the axes multiply to {math.prod(sizes.values())} "
            f"but there are {num_devices} devices; set one axis to -1 to take the rest"
        )
    return sizes


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def logical_to_spec(axes, shape=None, mesh=None, name: str = "") -> PartitionSpec:
    """Maps a tuple of logical names to a PartitionSpec; a dim the mesh cannot split is an error."""
    spec = []
    for i, axis in enumerate(axes or ()):
        mesh_axes = LOGICAL_RULES.get(axis) if axis else None
        if mesh_axes and mesh is not None and shape is not None:
            names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            size = math.prod(mesh.shape[a] for a in names)
            if shape[i] % size:
                raise ConfigError(
                    f"parameter {name} dimension {i} ({axis}={shape[i]}) cannot be split over "
                    f"mesh {'x'.join(names)}={size}; change the mesh or the model size"
                )
        spec.append(mesh_axes)
    return PartitionSpec(*spec)


def param_shardings(abstract_params: nnx.State, mesh: jax.sharding.Mesh) -> dict:
    """NamedShardings for a (pure-dict-shaped) parameter tree from its logical annotations."""

    def one(path, var):
        name = "/".join(str(p) for p in path)
        spec = logical_to_spec(var.get_metadata("out_sharding", None), var.value.shape, mesh, name)
        return NamedSharding(mesh, spec)

    flat = [(path, one(path, var)) for path, var in nnx.to_flat_state(abstract_params)]
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split over the mesh."""
    return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(LOGICAL_RULES["batch"]))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def per_device(fn, in_axes: tuple, out_axes: tuple):
    """`fn` run on each device's own shard (inputs and output split by their logical axes) under
    the mesh in context: XLA cannot split a Pallas call. Without a mesh, or already per device
    (inside shard_map), `fn` as it is. An input with no axes is gathered whole, and its gradient
    summed over the devices."""

    def run(*args):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.manual_axes:
            return fn(*args)
        in_specs = tuple(logical_to_spec(axes) for axes in in_axes)
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=logical_to_spec(out_axes),
                             check_vma=False)(*args)  # fmt: skip

    return run
