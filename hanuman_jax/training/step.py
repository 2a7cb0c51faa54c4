"""The train state, its sharded creation, and the pure jitted train step."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from hanuman_jax import sharding
from hanuman_jax.config import MAX_LOSS_SCALE, ConfigError, ModelConfig, check_batch_divides
from hanuman_jax.model import build, moe_parallel
from hanuman_jax.model.attention import Kernel
from hanuman_jax.model.transformer import Transformer
from hanuman_jax.planning import targets
from hanuman_jax.planning.targets import Target, device_target
from hanuman_jax.training import cross_entropy
from hanuman_jax.training.optim import make_optimizer

# state = {"step": int32[], "params": pure dict, "opt_state": optax state, "rng": uint32[2],
#          "guard": {"nonfinite_steps", "nonfinite_in_a_row", "loss_scale", "finite_in_a_row"}}
TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run: model, optimizer, mesh and state layout."""

    model_cfg: ModelConfig
    target: Target  # the device `model.attention` was resolved for
    kernel: Kernel | None  # the fused attention the model runs (None: XLA's)
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    abstract_state: TrainState
    state_shardings: TrainState
    aux_loss_coef: float
    z_loss_coef: float
    seed: int
    grad_accum_steps: int = 1
    loss_scale: float = 1.0  # the initial loss scale; dynamic (halves, regrows) under float16
    loss_scale_period: int = 0  # finite steps before it doubles; 0 = static (not float16)
    loss_chunk_rows: int = 128  # the loss's chunks hold at least this many tokens (cross_entropy)

    def model(self, params: dict) -> Transformer:
        """The model holding `params` (a pure dict, traced or concrete)."""
        return build.model_from_params(self.model_cfg, params, self.kernel)


def build_setup(
    cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, target: Target | None = None
) -> Setup:
    """Derives the abstract state and its shardings without allocating anything; resolves
    `model.attention` and `model.moe.grouped_matmul` for `target` (default: the mesh's
    devices)."""
    if cfg.model.vocab_size == 0:
        raise ConfigError("config model.vocab_size=0 must be resolved from the tokenizer first")
    model_cfg = ModelConfig.from_config(cfg.model)
    accum = cfg.train.grad_accum_steps
    where = f"the mesh {dict(mesh.shape)}"
    check_batch_divides(cfg.train.batch_size, accum, sharding.batch_shards(mesh), where)
    target = target or device_target(mesh.devices.flat[0])
    # the model only ever sees a concrete expert kernel: auto becomes the target's
    split = mesh.shape.get(moe_parallel.EXPERT_AXIS, 1) > 1
    impl = targets.grouped_matmul_impl(model_cfg, target, expert_parallel=split)
    moe = dataclasses.replace(model_cfg.moe, grouped_matmul=impl)
    model_cfg = dataclasses.replace(model_cfg, moe=moe)
    kernel = targets.attention_kernel(model_cfg, target)
    tx, schedule = make_optimizer(cfg)
    float16 = model_cfg.dtype == "float16"  # float16 overflows without a loss scale (T4)
    loss_scale = cfg.optimizer.loss_scale if float16 else 1.0
    init = functools.partial(_init_state, model_cfg, tx, cfg.train.seed, loss_scale)
    abstract_state = jax.eval_shape(init)
    experts = model_cfg.moe.num_experts
    return Setup(
        model_cfg=model_cfg,
        target=target,
        kernel=kernel,
        tx=tx,
        schedule=schedule,
        mesh=mesh,
        abstract_state=abstract_state,
        state_shardings=_state_shardings(abstract_state, model_cfg, tx, mesh),
        aux_loss_coef=cfg.model.moe.aux_loss_coef if experts else 0.0,
        z_loss_coef=cfg.model.moe.z_loss_coef if experts else 0.0,
        seed=cfg.train.seed,
        grad_accum_steps=accum,
        loss_scale=loss_scale,
        loss_scale_period=cfg.optimizer.loss_scale_period if float16 else 0,
        loss_chunk_rows=cross_entropy.min_chunk_rows(target.platform),
    )


def inference_setup(setup: Setup) -> Setup:
    """`setup` with the model as it runs outside training (evaluation, samples) on its target."""
    cfg = build.inference_config(setup.model_cfg, setup.target)
    return dataclasses.replace(
        setup, model_cfg=cfg, kernel=targets.attention_kernel(cfg, setup.target)
    )


def _state_shardings(abstract_state: TrainState, model_cfg: ModelConfig, tx, mesh) -> TrainState:
    """Parameters (and their optimizer moments) by the logical-axis table; the rest replicated."""
    param_shardings = sharding.param_shardings(build.abstract_model(model_cfg)[1], mesh)
    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_state["opt_state"],
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return {
        "step": replicated,
        "params": param_shardings,
        "opt_state": opt_shardings,
        "rng": replicated,
        "guard": jax.tree.map(lambda _: replicated, abstract_state["guard"]),
    }


def _init_state(
    model_cfg: ModelConfig, tx, seed: int, loss_scale: float, params: dict | None = None
) -> TrainState:
    init_key, train_key = jax.random.split(jax.random.key(seed))
    if params is None:
        params = build.init_params(model_cfg, init_key)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(train_key),
        # numerical faults: steps skipped for a non-finite loss or gradient, and the loss scale
        "guard": {
            "nonfinite_steps": jnp.zeros((), jnp.int32),
            "nonfinite_in_a_row": jnp.zeros((), jnp.int32),
            "loss_scale": jnp.asarray(loss_scale, jnp.float32),
            "finite_in_a_row": jnp.zeros((), jnp.int32),
        },
    }


def init_state(setup: Setup, params: dict | None = None) -> TrainState:
    """Creates parameters and optimizer state directly in their sharded layout; with `params`
    (already in `state_shardings["params"]`, e.g. another run's), a fresh state around them."""
    init = functools.partial(_init_state, setup.model_cfg, setup.tx, setup.seed, setup.loss_scale)
    if params is None:
        return jax.jit(init, out_shardings=setup.state_shardings)()
    return jax.jit(
        init,
        in_shardings=(setup.state_shardings["params"],),
        out_shardings=setup.state_shardings,
    )(params)


def target_mask(batch: dict) -> jax.Array:
    """Targets that count: they continue the same document and the data marks them trained on."""
    seg = batch["segment_ids"]
    return (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0) & (batch["loss_mask"][:, 1:] != 0)


def loss_fn(
    setup: Setup,
    params: dict,
    batch: dict,
    rng: jax.Array | None,
    *,
    num_targets: jax.Array | None = None,
    share: float = 1.0,
):
    """Next-token cross-entropy over the trained targets, plus the MoE auxiliary losses.

    For a micro-batch, `num_targets` is the whole batch's count and `share` its share of the
    batch (1 / micro-batches): every value returned is then this micro-batch's part of the whole
    batch's, and summing over micro-batches gives it. The cross-entropy sums exactly; the MoE
    losses and statistics are the mean of the micro-batches' own (balance is measured per
    micro-batch, as Megatron-LM does)."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    model = setup.model(params)
    # the last position has no target: the LM head and the loss read the rest (cross_entropy.py)
    h_BTD, aux, _ = model.features(tokens, seg, batch["positions"], rng)
    mask_BT = target_mask(batch)
    if num_targets is None:
        num_targets = jnp.sum(mask_BT)
    b, t = tokens.shape
    shards = sharding.batch_shards(setup.mesh)
    vocab = setup.model_cfg.vocab_size
    pieces, chunks, _ = cross_entropy.chunk_plan(b, t - 1, vocab, shards, setup.loss_chunk_rows)
    weight_BT = mask_BT / jnp.maximum(num_targets, 1).astype(jnp.float32)
    ce = cross_entropy.linear_cross_entropy(
        h_BTD[:, :-1], model.head_VD(), tokens[:, 1:], weight_BT, chunks=chunks, pieces=pieces
    )
    n_moe = setup.model_cfg.num_layers if setup.model_cfg.moe.num_experts else 1
    aux_loss = share * aux.get("aux_loss", 0.0) / n_moe
    z_loss = share * aux.get("z_loss", 0.0) / n_moe
    total = ce + setup.aux_loss_coef * aux_loss + setup.z_loss_coef * z_loss
    metrics = {
        "loss": ce,
        "aux_loss": aux_loss,
        "z_loss": z_loss,
        "tokens": jnp.sum(mask_BT),
        "packing_efficiency": share * jnp.mean(seg != 0),  # share of the batch not padding
    }
    for name in ("load_max", "load_min", "router_entropy", "dropped"):
        if name in aux:  # per MoE layer: moe/<name>/layer_NN
            metrics |= {f"moe/{name}/layer_{i:02d}": share * v for i, v in enumerate(aux[name])}
    return total, metrics


def micro_batches(batch: dict, count: int, mesh: jax.sharding.Mesh) -> dict:
    """[count, rows / count, ...]: micro-batch m takes rows m, m + count, ... With each device
    holding a contiguous block of rows, every micro-batch keeps rows on every device."""

    def split(x):
        rows = x.shape[0]
        x = x.reshape(rows // count, count, *x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, sharding.LOGICAL_RULES["batch"])
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def _scaled(fn, scale):
    """`fn` with its first output multiplied by `scale` (the loss scale; 1.0 but in float16)."""

    def scaled(*args):
        total, metrics = fn(*args)
        return total * scale, metrics

    return scaled


def gradients(setup: Setup, params: dict, batch: dict, rng: jax.Array, scale=1.0):
    """(total loss x scale, metrics), gradients of that, for the whole batch: over
    `grad_accum_steps` micro-batches when it is more than 1 (a scan: one micro-batch's
    activations live at a time; the gradients accumulate in the parameters' dtype and
    sharding)."""
    count = setup.grad_accum_steps
    if count == 1:
        grad_fn = jax.value_and_grad(
            _scaled(lambda p: loss_fn(setup, p, batch, rng), scale), has_aux=True
        )
        return grad_fn(params)
    num_targets = jnp.sum(target_mask(batch))

    def one(carry, micro):
        index, micro_batch = micro

        def micro_loss(p):
            return loss_fn(setup, p, micro_batch, jax.random.fold_in(rng, index),
                           num_targets=num_targets, share=1.0 / count)  # fmt: skip

        grad_fn = jax.value_and_grad(_scaled(micro_loss, scale), has_aux=True)
        out, grads = grad_fn(params)
        return jax.tree.map(jnp.add, carry, (out, grads)), None

    micros = micro_batches(batch, count, setup.mesh)
    first = jax.tree.map(lambda x: x[0], micros)
    out_shapes = jax.eval_shape(lambda: loss_fn(setup, params, first, rng, num_targets=num_targets))
    out_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes)
    grad_zeros = jax.tree.map(jnp.zeros_like, params)  # gradients have the params' dtypes
    grad_zeros = jax.lax.with_sharding_constraint(grad_zeros, setup.state_shardings["params"])
    summed, _ = jax.lax.scan(one, (out_zeros, grad_zeros), (jnp.arange(count), micros))
    return summed


def train_step(setup: Setup, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimizer step. A step whose loss or gradient is not finite changes neither the
    parameters nor the optimizer state; it is counted in `guard` (and under float16 it halves
    the loss scale, which doubles again after `loss_scale_period` finite steps)."""
    guard = state["guard"]
    # within the cap also when a checkpoint from before it holds more (or inf)
    scale = jnp.minimum(guard["loss_scale"], MAX_LOSS_SCALE)
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    (total, metrics), grads = gradients(setup, state["params"], batch, step_rng, scale)
    total = total / scale
    grads = jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)
    params, opt_state, grad_norm, finite = guarded_update(setup, state, total, grads)
    guard = _next_guard(setup, guard, finite)
    metrics |= {
        "total_loss": total,
        "grad_norm": grad_norm,
        # the rate this step's update used: optax counts committed updates only, so each
        # skipped (non-finite) step holds the schedule back one step
        "lr": setup.schedule(state["step"] - state["guard"]["nonfinite_steps"]),
        "nonfinite_steps": guard["nonfinite_steps"],
        "nonfinite_in_a_row": guard["nonfinite_in_a_row"],
    }
    if setup.loss_scale_period:
        metrics["loss_scale"] = guard["loss_scale"]
    new_state = {
        **state,
        "step": state["step"] + 1,
        "params": params,
        "opt_state": opt_state,
        "guard": guard,
    }
    return new_state, metrics


def guarded_update(
    setup: Setup, state: TrainState, total: jax.Array, grads: dict
) -> tuple[dict, dict, jax.Array, jax.Array]:
    """(params, optimizer state, gradient norm, finite) after the update from `grads`; a step
    whose loss or gradient norm is not finite keeps the old parameters and moments. A NaN or
    inf in any gradient makes the norm one too: one pass over the gradients, not two (the
    clipping reads the same norm); a norm past float32's range is skipped with them."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)

    def keep(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    return keep(params, state["params"]), keep(opt_state, state["opt_state"]), grad_norm, finite


def _next_guard(setup: Setup, guard: dict, finite: jax.Array) -> dict:
    in_a_row = jnp.where(finite, 0, guard["nonfinite_in_a_row"] + 1)
    finite_run = jnp.where(finite, guard["finite_in_a_row"] + 1, 0)
    scale = jnp.minimum(guard["loss_scale"], MAX_LOSS_SCALE)
    if setup.loss_scale_period:  # dynamic: halve on overflow, double after a finite period
        grow = finite_run >= setup.loss_scale_period
        grown = jnp.minimum(scale * 2, MAX_LOSS_SCALE)
        scale = jnp.where(finite, jnp.where(grow, grown, scale), jnp.maximum(scale / 2, 1.0))
        finite_run = jnp.where(grow, 0, finite_run)
    return {
        "nonfinite_steps": guard["nonfinite_steps"] + (~finite).astype(jnp.int32),
        "nonfinite_in_a_row": in_a_row,
        "loss_scale": scale,
        "finite_in_a_row": finite_run,
    }


def _under_mesh(fn, mesh: jax.sharding.Mesh):
    """`fn` traced with `mesh` in context: the expert-parallel MoE (moe_parallel) runs on it. The
    context is entered inside the traced function, so the result stays a jitted function (with
    `.lower`) that callers need not wrap."""

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def jit_train_step(setup: Setup):
    """The compiled step: state donated and kept in its sharding, batch sharded over batch axes."""
    batch_sharding = sharding.batch_sharding(setup.mesh)
    return jax.jit(
        _under_mesh(lambda state, batch: train_step(setup, state, batch), setup.mesh),
        in_shardings=(setup.state_shardings, batch_sharding),
        out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
        donate_argnums=(0,),
    )


def eval_step(setup: Setup, params: dict, batch: dict) -> dict:
    """Summed next-token loss and target count of one batch (deterministic: no router noise), in
    the train step's `grad_accum_steps` micro-batches: a batch too big for one pass in training
    is one for the evaluation too."""

    def sums(micro_batch: dict) -> dict:
        _, metrics = loss_fn(setup, params, micro_batch, None)
        return {"nll_sum": metrics["loss"] * metrics["tokens"], "tokens": metrics["tokens"]}

    count = setup.grad_accum_steps
    if count == 1:
        return sums(batch)
    micros = micro_batches(batch, count, setup.mesh)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(sums, jax.tree.map(lambda x: x[0], micros)))  # fmt: skip
    total, _ = jax.lax.scan(lambda c, m: (jax.tree.map(jnp.add, c, sums(m)), None), zeros, micros)
    return total


def jit_eval_step(setup: Setup):
    return jax.jit(
        _under_mesh(lambda params, batch: eval_step(setup, params, batch), setup.mesh),
        in_shardings=(setup.state_shardings["params"], sharding.batch_sharding(setup.mesh)),
        out_shardings=sharding.replicated(setup.mesh),
    )
