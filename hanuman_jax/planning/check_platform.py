"""`python -m hanuman_jax.train --config C --check-platform tpu|cuda`: lowers the config's sharded
train step, its evaluation step and generation for a TPU or an NVIDIA GPU, here, without one.

The mesh is abstract (`jax.sharding.AbstractMesh`: axis sizes, no devices) and every input a
`jax.ShapeDtypeStruct` carrying its sharding, so `jax.export` lowers each step for the platform
named while allocating and compiling nothing. cuDNN attention is the one kernel that cannot lower
without its library: on cuda the XLA attention is lowered in its place, and the report says so."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from hanuman_jax import sharding
from hanuman_jax.config import MESH_AXES, ConfigError
from hanuman_jax.model import build
from hanuman_jax.model.attention import cudnn_attention, splash_block
from hanuman_jax.planning import targets
from hanuman_jax.planning.targets import Target

# jax.export's name for each platform, the target its kernels are chosen for (cuda: a GPU of
# compute capability 8.0+, where auto picks cuDNN), and the devices a -1 mesh axis stands for
# when --check-devices is not given (a v2-8 or v5e-8 slice; one GPU)
PLATFORMS = {"tpu": (Target("tpu"), 8), "cuda": (Target("gpu", 9.0), 1)}
CUDNN_STAND_IN = "cudnn (checked as xla: cuDNN cannot lower without a GPU)"
GENERATE_PROMPT, GENERATE_NEW, GENERATE_TOP_K = 16, 16, 8  # the generation lowered: tokens, top-k


def abstract_mesh(mesh_cfg: ml_collections.ConfigDict, devices: int) -> jax.sharding.AbstractMesh:
    """The config's mesh over `devices` devices that do not exist here."""
    sizes = sharding.mesh_shape(mesh_cfg, devices)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=auto)


def device_count(mesh_cfg: ml_collections.ConfigDict, platform: str, devices: int | None) -> int:
    """`devices` if given, else the mesh's product (the platform's default where an axis is -1)."""
    if devices is not None:
        if devices < 1:
            raise ConfigError(f"--check-devices={devices} is invalid: must be >= 1")
        return devices
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    return PLATFORMS[platform][1] if -1 in sizes else math.prod(sizes)


def _batch(rows: int, length: int, batch_sharding) -> dict:
    """A packed batch as the data pipeline makes it, abstract."""
    row = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch_sharding)
    return dict.fromkeys(("tokens", "segment_ids", "positions", "loss_mask"), row)


def _stand_in(setup):
    """`setup` with XLA's attention in place of cuDNN's, which lowers only where cuDNN is."""
    if setup.kernel is cudnn_attention:
        return dataclasses.replace(setup, kernel=None)
    return setup


def lower(part: str, fn: Callable, args: tuple, platform: str, kernels: str) -> jax.export.Exported:
    """`fn(*args)` exported for `platform`; a ConfigError naming `part` where it does not lower."""
    try:
        exported = jax.export.export(fn, platforms=[platform])(*args)
    except Exception as e:  # whatever stops the lowering (XLA, Pallas, jax) is the answer
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"the {part} does not lower for {platform} ({kernels}): {type(e).__name__}: {reason}"
        ) from None
    return exported


def _attention(model_cfg, target: Target, seq_len: int, lowered) -> str:
    """The attention `model.attention` means on `target`, as the setup `lowered` runs it."""
    name = targets.resolve_attention(model_cfg.attention, model_cfg.dtype, model_cfg.hd, target)
    if name == "cudnn" and lowered.kernel is None:
        return CUDNN_STAND_IN
    if name == "splash" and not splash_block(seq_len):
        return f"splash (xla for rows of {seq_len} tokens, no multiple of 128)"
    return name


def check_platform(cfg: ml_collections.ConfigDict, platform: str, devices: int | None = None):
    """Lowers the train step, the evaluation step and generation of `cfg` for `platform` (tpu or
    cuda) on abstract devices: (the report, the exports by part). A part that does not lower is a
    ConfigError."""
    from hanuman_jax.checkpoint.manager import abstract_with_shardings
    from hanuman_jax.training.step import (
        build_setup,
        inference_setup,
        jit_eval_step,
        jit_train_step,
    )

    target, _ = PLATFORMS[platform]
    count = device_count(cfg.mesh, platform, devices)
    mesh = abstract_mesh(cfg.mesh, count)
    setup = build_setup(cfg, mesh, target)
    train_setup, eval_setup = _stand_in(setup), _stand_in(inference_setup(setup))
    attention = _attention(setup.model_cfg, target, cfg.data.seq_len, train_setup)
    moe = setup.model_cfg.moe  # build_setup resolved its kernel for the target
    grouped_matmul = moe.grouped_matmul if moe.num_experts else None
    kernels = f"attention={attention}, grouped_matmul={grouped_matmul}"
    batch = _batch(cfg.train.batch_size, cfg.data.seq_len, sharding.batch_sharding(mesh))
    state = abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    train, evaluate = jit_train_step(train_setup), jit_eval_step(eval_setup)
    exports = {
        "train step": lower("train step", train, (state, batch), platform, kernels),
        "eval step": lower("eval step", evaluate, (state["params"], batch), platform, kernels),
        "generation": _lower_generation(setup, target, platform, kernels),
    }
    sizes = {part: len(e.mlir_module_serialized) for part, e in exports.items()}
    report = {
        "platform": platform,
        "devices": count,
        "mesh": dict(mesh.shape),
        "attention": attention,
        "grouped_matmul": grouped_matmul,
        "lowered_bytes": sizes,
        "ok": True,
    }
    return report, exports


def _lower_generation(setup, target: Target, platform: str, kernels: str) -> jax.export.Exported:
    """Generation as `inference.generate` runs it (one device, sampling with top-k and top-p)."""
    from hanuman_jax.inference.generate import MAX_STOP_IDS, compiled_generation

    cfg = build.inference_config(setup.model_cfg, target)
    prompt = min(GENERATE_PROMPT, cfg.max_seq_len - 1)
    new = min(GENERATE_NEW, cfg.max_seq_len - prompt)
    run = compiled_generation(
        cfg, prompt, new, False, min(GENERATE_TOP_K, cfg.vocab_size - 1), True
    )
    i32, f32 = jnp.int32, jnp.float32
    args = (
        build.abstract_params(cfg),
        jax.ShapeDtypeStruct((1, prompt), i32),
        jax.ShapeDtypeStruct((1,), i32),
        jax.ShapeDtypeStruct((MAX_STOP_IDS,), i32),
        jax.eval_shape(lambda: jax.random.key(0)),
        jax.ShapeDtypeStruct((), f32),
        jax.ShapeDtypeStruct((), f32),
    )
    return lower("generation", run, args, platform, kernels)
