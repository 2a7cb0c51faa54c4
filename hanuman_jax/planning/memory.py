"""Memory planner: per-device bytes of parameters, optimizer state, gradients and activations.

    python -m hanuman_jax.memory --config configs/NAME.py [--device t4|h100|v2-8|v5e-1|v6e-1|...]
                                 [--config.a.b=value ...]

Parameters and optimizer state are counted from the abstract train state and divided by the mesh
as `sharding.py` lays them out. Activations are the residuals that the backward pass keeps from
the forward pass, found by tracing `jax.vjp` of the real loss on one micro-batch (nothing is
allocated), with the attention the target device runs (on a GPU that runs cuDNN flash
attention, attention_stand_in.py: a stand-in that keeps what it keeps). On CPU the total is close
to XLA's own `memory_analysis()` of the compiled step (tests/test_memory.py holds it within a
tolerance; BENCHMARKS.md has the figures).

That holds for XLA:CPU's default scheduler, which `train` keeps when `model.remat` is none.
Under remat the plan counts what jax.checkpoint keeps, and `train` switches XLA:CPU to its
memory-minimising scheduler; XLA:CPU then needs far more than the plan says and, without remat,
less (BENCHMARKS.md, "Memory planner vs XLA"). Check GPU and TPU figures against `memory_stats()`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.extend import core as jax_core

from hanuman_jax import cli, sharding
from hanuman_jax.config import (
    MESH_AXES,
    ConfigError,
    ModelConfig,
    check_batch_divides,
    load_config,
)
from hanuman_jax.model.attention import cudnn_attention
from hanuman_jax.model.build import abstract_model
from hanuman_jax.planning.attention_stand_in import cudnn_stand_in
from hanuman_jax.planning.targets import Target, local_target, resolve_attention
from hanuman_jax.training import cross_entropy

MiB = 1 << 20
GiB = 1 << 30


class Device(typing.NamedTuple):
    """A named device: how many JAX devices it is, the HBM of each, and what picks its kernels."""

    devices: int  # JAX devices: chips, except on v2/v3 where each of a chip's 2 cores is one
    hbm: int  # bytes per JAX device (v2/v3: half a chip's)
    target: Target


def _gpu(hbm_mib: int, capability: float) -> Device:
    return Device(1, hbm_mib * MiB, Target("gpu", capability))


def _tpu(devices: int, hbm_gib: int) -> Device:
    return Device(devices, hbm_gib * GiB, Target("tpu"))


# GPU memory as nvidia-smi reports it (MiB)
DEVICES: dict[str, Device] = {
    "t4": _gpu(15_360, 7.5),  # 16 GB GDDR6. No cuDNN flash attention (capability 7.5)
    "a100": _gpu(40_960, 8.0),
    "a100-80": _gpu(81_920, 8.0),
    "h100": _gpu(81_559, 9.0),  # SXM, 80 GB HBM3
    "h200": _gpu(143_771, 9.0),  # 141 GB HBM3e
    "v2-8": _tpu(8, 8),  # 4 chips x 2 cores x 8 GiB
    "v3-8": _tpu(8, 16),  # 4 chips x 2 cores x 16 GiB
    "v4-8": _tpu(4, 32),  # 4 chips x 32 GiB
    "v5e-1": _tpu(1, 16),  # 1 chip x 16 GiB (a Colab TPU runtime)
    "v5e-8": _tpu(8, 16),  # 8 chips x 16 GiB
    "v5p-8": _tpu(4, 95),  # 4 chips x 95 GiB
    "v6e-1": _tpu(1, 32),  # 1 chip x 32 GiB (a Colab TPU runtime)
    "v6e-8": _tpu(8, 32),  # 8 chips x 32 GiB
}


@dataclasses.dataclass
class Plan:
    """Bytes per device; `total` is what the compiled train step needs at its peak."""

    devices: int
    mesh: dict[str, int]
    micro_batch: int  # sequences per device per forward/backward pass
    params: int
    opt_state: int
    grads: int
    activations: int
    batch: int

    @property
    def total(self) -> int:
        return self.params + self.opt_state + self.grads + self.activations + self.batch


def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def _one_device_cfg(cfg: ml_collections.ConfigDict, remat: str | None = None):
    """A copy of `cfg` on a one-device mesh, with `model.remat` set to `remat` if given."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if remat is not None:
        cfg.model.remat = remat
    for axis in MESH_AXES:
        cfg.mesh[axis] = 1
    return cfg


def _setup(cfg: ml_collections.ConfigDict, target: Target):
    """The train setup on this process's first device with `model.attention` resolved for
    `target`; where that is cuDNN flash attention, the model runs the stand-in (any backend
    traces it)."""
    from hanuman_jax.training.step import build_setup

    one = ml_collections.ConfigDict({a: 1 for a in MESH_AXES})
    setup = build_setup(cfg, sharding.make_mesh(one, jax.devices()[:1]), target)
    if setup.kernel is cudnn_attention:
        setup = dataclasses.replace(setup, kernel=cudnn_stand_in)
    return setup


def residual_bytes(f, *args) -> int:
    """Bytes that the backward of `f` keeps from its forward: `jax.vjp`'s residuals, less those
    that are the arguments themselves (they are held anyway)."""
    closed, shapes = jax.make_jaxpr(lambda *a: jax.vjp(f, *a), return_shape=True)(*args)
    jaxpr = closed.jaxpr
    num_res = len(jax.tree.leaves(shapes[1]))
    inputs, seen, total = set(jaxpr.invars), set(), 0
    for v in jaxpr.outvars[len(jaxpr.outvars) - num_res :]:
        if isinstance(v, jax_core.Literal) or v in inputs or v in seen:
            continue
        seen.add(v)
        total += _nbytes(v.aval)
    return total


def lower_train_step(setup, state, batch) -> jax.stages.Lowered:
    """The trainer's jitted step, lowered ahead of time for XLA's cost and memory analyses;
    `state` and `batch` may be abstract."""
    from hanuman_jax.training.step import jit_train_step

    return jit_train_step(setup).lower(state, batch)


def xla_footprint(compiled: jax.stages.Compiled) -> tuple[int, int]:
    """Bytes XLA assigned to the compiled step: arguments + outputs - donated (aliased) +
    temporaries, and the temporaries alone."""
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)  # fmt: skip
    return total, m.temp_size_in_bytes


def _abstract_batch(b: int, t: int) -> dict:
    return {
        k: jax.ShapeDtypeStruct((b, t), jnp.int32)
        for k in ("tokens", "segment_ids", "positions", "loss_mask")
    }


def _loss_residuals(setup, b: int, t: int) -> int:
    from hanuman_jax.training.step import loss_fn

    return residual_bytes(
        lambda params, batch: loss_fn(setup, params, batch, jax.random.key(0))[0],
        setup.abstract_state["params"],
        _abstract_batch(b, t),
    )


def activation_bytes(cfg: ml_collections.ConfigDict, micro_batch: int, target: Target) -> int:
    """Residuals of one micro-batch under `model.remat`, with the attention kernel that
    `model.attention` means on `target`, and what the loss holds beside all of them while it
    runs: one chunk's float32 logits and their gradient (cross_entropy.py; the chunks on
    `target`). With remat, add one block's share of what remat saves: the residuals that block
    recomputes and holds while it runs its backward."""
    t = cfg.data.seq_len
    min_rows = cross_entropy.min_chunk_rows(target.platform)
    vocab = cfg.model.vocab_size
    _, _, chunk_rows = cross_entropy.chunk_plan(micro_batch, t - 1, vocab, 1, min_rows)
    logits_grad = 2 * chunk_rows * vocab * 4
    kept = _loss_residuals(_setup(_one_device_cfg(cfg), target), micro_batch, t) + logits_grad
    if cfg.model.get("remat", "none") == "none":
        return kept
    plain_setup = _setup(_one_device_cfg(cfg, "none"), target)
    plain = _loss_residuals(plain_setup, micro_batch, t) + logits_grad
    return kept + (plain - kept) // cfg.model.num_layers


class _MeshShape:
    """Just enough of a Mesh for `sharding.logical_to_spec` to check and size a split."""

    def __init__(self, shape: dict[str, int]):
        self.shape = shape


def _shard_divisors(setup, mesh_sizes: dict[str, int]) -> dict:
    """How many ways each parameter is split over the mesh (by the logical-axis table)."""
    from flax import nnx

    fake = _MeshShape(mesh_sizes)

    def ways(path, var) -> int:
        name = "/".join(str(p) for p in path)
        axes = var.get_metadata("out_sharding", None)
        spec = sharding.logical_to_spec(axes, var.get_value().shape, fake, name)
        names = [a for part in spec if part for a in ((part,) if isinstance(part, str) else part)]
        return int(np.prod([mesh_sizes[a] for a in names])) if names else 1

    flat = [(p, ways(p, v)) for p, v in nnx.to_flat_state(abstract_model(setup.model_cfg)[1])]
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


def plan(cfg: ml_collections.ConfigDict, num_devices: int, target: Target | None = None) -> Plan:
    """Per-device memory of training `cfg` on `num_devices` devices of `target` (default: this
    process's)."""
    mesh = sharding.mesh_shape(cfg.mesh, num_devices)
    shards = int(np.prod([mesh[a] for a in sharding.LOGICAL_RULES["batch"]]))
    accum = cfg.train.get("grad_accum_steps", 1)
    check_batch_divides(cfg.train.batch_size, accum, shards, f"the mesh {mesh}")
    micro = cfg.train.batch_size // (shards * accum)
    target = target or local_target()
    setup = _setup(_one_device_cfg(cfg), target)
    divisors = _shard_divisors(setup, mesh)
    abstract = setup.abstract_state
    param_bytes = jax.tree.map(lambda p, d: _nbytes(p) // d, abstract["params"], divisors)
    opt_bytes = optax.tree_map_params(
        setup.tx,
        lambda leaf, d: _nbytes(leaf) // d,
        abstract["opt_state"],
        divisors,
        transform_non_params=_nbytes,
    )
    params = sum(jax.tree.leaves(param_bytes))
    # Accumulation keeps a running sum next to each micro-batch's gradients.
    grads = params * (2 if accum > 1 else 1)
    # Heads, FFN hidden and vocab split over `tensor`; the residual stream does not (an estimate).
    activations = activation_bytes(cfg, micro, target) // mesh["tensor"]
    # the step's whole batch arrives at once: tokens, segment_ids, positions, loss_mask (int32)
    batch = 4 * 4 * micro * accum * cfg.data.seq_len
    return Plan(num_devices, mesh, micro, params, sum(jax.tree.leaves(opt_bytes)), grads,
                activations, batch)  # fmt: skip


def param_count(cfg: ModelConfig) -> int:
    """The parameters `cfg` builds, in closed form: instant where counting the abstract model
    (model/build.py count_params; tests hold the two equal) takes minutes, at 100,000 layers."""
    d, f, experts = cfg.d_model, cfg.ffn_hidden, cfg.moe.num_experts
    attention = d * cfg.hd * 2 * (cfg.num_heads + cfg.num_kv_heads)  # wq, wo; wk, wv
    ffn = experts * d * (1 + 3 * f) if experts else 3 * d * f  # router and experts; or SwiGLU
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.num_layers * (2 * d + attention + ffn) + d  # norms: 2 a block, 1 last


def _this_device_bytes() -> int:
    """The memory of this process's first device: what its backend reports (GPU, TPU), or the
    host's RAM on a CPU."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int((device.memory_stats() or {}).get("bytes_limit", 0))


def check_fits(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """Refuses, before anything is built, a run that no device could hold: a floor under each
    device's bytes, in closed form, above the largest device in DEVICES and this one. The floor is
    the weights, AdamW's two moments and the gradients split over every axis that splits
    parameters, and the step's batch (4 int32 per token) with each block's input kept for the
    backward pass (what remat=full keeps) split over the batch axes; `plan` is the full figure."""
    model = ModelConfig.from_config(cfg.model)
    mesh = sharding.mesh_shape(cfg.mesh, num_devices)
    params = param_count(model)
    ways = mesh["fsdp"] * mesh["tensor"] * mesh["expert"]
    state = 4 * params * jnp.dtype(model.param_dtype).itemsize // ways
    rows = cfg.train.batch_size // int(np.prod([mesh[a] for a in sharding.LOGICAL_RULES["batch"]]))
    t = cfg.data.seq_len
    kept = rows // cfg.train.grad_accum_steps * t * model.num_layers * model.d_model
    data = 4 * 4 * rows * t + kept * jnp.dtype(model.dtype).itemsize
    name, largest = max(DEVICES.items(), key=lambda item: item[1].hbm)
    here = _this_device_bytes()
    if state + data <= max(largest.hbm, here):  # a device bigger than any in DEVICES runs it
        return
    sizes = [
        f"model.vocab_size={model.vocab_size}, num_layers={model.num_layers}, d_model="
        f"{model.d_model}, ffn_hidden={model.ffn_hidden}, moe.num_experts={model.moe.num_experts}",
        f"train.batch_size={cfg.train.batch_size}, data.seq_len={t}",
    ]
    fmt = lambda n: _fmt(n).strip()
    raise ConfigError(
        f"config {'; '.join(sizes[:: 1 if state >= data else -1])} cannot train on any device the "
        f"planner knows: each of the {num_devices} device(s) needs at least {fmt(state + data)} "
        f"({fmt(state)} for the weights, AdamW state and gradients of {params:,} parameters split "
        f"{ways} ways by mesh fsdp x tensor x expert; {fmt(data)} for {rows:,} rows of {t} tokens "
        f"and each block's input), more than the largest, {name}'s {fmt(largest.hbm)}, and this "
        f"device's {fmt(here)}; make the model or the batch smaller, or split them over more "
        "devices"
    )


def usable_bytes(device: str) -> int:
    """Memory XLA may use on one device: on GPUs JAX preallocates a fraction, 75 % unless
    XLA_CLIENT_MEM_FRACTION (or the older XLA_PYTHON_CLIENT_MEM_FRACTION; jaxlib refuses both at
    once) says otherwise. With XLA_PYTHON_CLIENT_PREALLOCATE=false the same fraction is a fair
    budget: the rest is for everything else in the process."""
    d = DEVICES[device]
    if d.target.platform != "gpu":
        return d.hbm
    env = os.environ
    fraction = env.get("XLA_CLIENT_MEM_FRACTION") or env.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    return int(d.hbm * float(fraction or "0.75"))


def _fmt(n: int) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / (1 << 20):8.1f} MiB"


def report(cfg: ml_collections.ConfigDict, device: str | None) -> str:
    num = DEVICES[device].devices if device else jax.device_count()
    target = DEVICES[device].target if device else local_target()
    p = plan(cfg, num, target)
    accum = cfg.train.get("grad_accum_steps", 1)
    model_cfg = ModelConfig.from_config(cfg.model)
    attention = resolve_attention(model_cfg.attention, model_cfg.dtype, model_cfg.hd, target)
    if attention == "xla":
        block = model_cfg.attention_block
        attention += f" in blocks of {block} query rows" if block else " (all scores at once)"
    lines = [
        f"mesh {p.mesh} on {num} {device or jax.default_backend()} device(s); "
        f"micro-batch {p.micro_batch} x {cfg.data.seq_len} tokens per device; "
        f"model.dtype {cfg.model.dtype}, param_dtype {cfg.model.param_dtype}, "
        f"remat {cfg.model.get('remat', 'none')}, grad_accum_steps {accum}, "
        f"attention {attention}",
        f"parameters        {_fmt(p.params)}",
        f"optimizer state   {_fmt(p.opt_state)}",
        f"gradients         {_fmt(p.grads)}",
        f"activations       {_fmt(p.activations)}   (per micro-batch)",
        f"batch             {_fmt(p.batch)}",
        f"total per device  {_fmt(p.total)}",
    ]
    if device:
        usable = usable_bytes(device)
        verdict = "fits" if p.total <= usable else "does NOT fit"
        lines.append(
            f"{device}: {verdict} ({100 * p.total / usable:.0f}% of {_fmt(usable).strip()} usable)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser("hanuman_jax.memory", __doc__)
    cli.add_config_flag(parser)
    parser.add_argument("--device", choices=sorted(DEVICES),
                        help="plan for this device (default: the devices JAX sees)")  # fmt: skip
    args, overrides = cli.parse_with_overrides(parser, argv)
    try:
        cfg = load_config(args.config, overrides)
        if cfg.model.vocab_size == 0:
            from hanuman_jax.training.loop import load_tokenizer

            load_tokenizer(cfg)
        print(report(cfg, args.device))
    except ConfigError as e:
        return cli.fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
