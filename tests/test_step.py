import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hanuman_jax import sharding
from hanuman_jax.config import load_config
from hanuman_jax.training.optim import lr_schedule
from hanuman_jax.training.step import (
    build_setup,
    init_state,
    jit_eval_step,
    jit_train_step,
    loss_fn,
)


def _cfg(root, *extra):
    return load_config(
        root / "configs" / "tiny.py",
        [
            "--config.model.vocab_size=97",
            "--config.model.num_layers=2",
            "--config.model.d_model=40",
            "--config.model.num_heads=5",
            "--config.model.num_kv_heads=1",
            "--config.model.ffn_hidden=24",
            "--config.data.seq_len=24",
            "--config.train.batch_size=4",
            "--config.train.steps=20",
            "--config.optimizer.peak_lr=1e-2",
            *extra,
        ],
    )


def _batch(seed=0, b=4, t=24, vocab=97):
    rng = np.random.default_rng(seed)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2 :] = 2
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)]).astype(np.int32)
    return {
        "tokens": rng.integers(0, vocab, (b, t)).astype(np.int32),
        "segment_ids": seg,
        "positions": np.tile(pos, (b, 1)),
        "loss_mask": np.ones((b, t), np.int32),
    }


def test_twenty_steps_on_a_fixed_batch_cut_the_loss(root):
    cfg = _cfg(root)
    mesh = sharding.make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    state = init_state(setup)
    step = jit_train_step(setup)
    batch = sharding.global_batch(_batch(), mesh)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state["step"]) == 20
    assert losses[-1] < 0.5 * losses[0], losses
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["aux_loss"]) > 0


def test_loss_counts_only_trained_targets_within_a_document(root):
    cfg = _cfg(root)
    setup = build_setup(cfg, sharding.make_mesh(cfg.mesh))
    params = init_state(setup)["params"]
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    _, m = loss_fn(setup, params, batch, None)
    # 23 targets per row, minus the one that would cross from document 1 into document 2
    assert int(m["tokens"]) == 4 * 22
    mask = np.ones((4, 24), np.int32)
    mask[:, :6] = 0  # e.g. a prompt: its tokens are not targets
    _, masked = loss_fn(setup, params, {**batch, "loss_mask": jnp.asarray(mask)}, None)
    assert int(masked["tokens"]) == 4 * 22 - 4 * 5

    logits, _ = setup.model(params)(batch["tokens"], batch["segment_ids"], batch["positions"])
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    keep = np.ones((4, 23), bool)
    keep[:, 11] = False  # the cross-document target
    keep[:, :5] = False
    np.testing.assert_allclose(masked["loss"], nll[keep].mean(), rtol=1e-5)


def test_weight_decay_skips_norms_and_schedule_shape(root):
    cfg = _cfg(root, "--config.optimizer.weight_decay=0.5", "--config.optimizer.peak_lr=1e-3")
    setup = build_setup(cfg, sharding.make_mesh(cfg.mesh))
    state = init_state(setup)
    zero = jax.tree.map(jnp.zeros_like, state["params"])
    updates, _ = setup.tx.update(zero, state["opt_state"], state["params"])
    layer = updates["layers"][0]
    assert float(jnp.abs(layer["attn_norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(layer["attn"]["wq"]).max()) > 0.0
    assert float(jnp.abs(updates["embed"]).max()) > 0.0
    for name in ("router", "w_gate", "w_up", "w_down"):  # experts and router are matrices
        assert float(jnp.abs(layer["moe"][name]).min()) > 0.0
    assert float(jnp.abs(updates["final_norm"]["scale"]).max()) == 0.0

    sched = lr_schedule(cfg)  # 20 steps, 5% warmup = 1 step
    assert float(sched(0)) == pytest.approx(1e-3)
    assert float(sched(20)) == pytest.approx(1e-4, rel=1e-5)  # reaches the floor at the end
    assert 1e-4 < float(sched(19)) < 1.1e-4
    assert float(sched(10)) < float(sched(5)) < 1e-3


@pytest.mark.parametrize(
    "moe", [["--config.model.moe.num_experts=0"], ["--config.model.moe.aux_loss_coef=0.0"]]
)
def test_grad_accumulation_equals_the_large_batch(root, moe):
    """4 micro-batches of 2 sequences = one batch of 8: the first gradients within 1e-6 and
    every metric of 3 steps. (The MoE balance loss is measured per micro-batch, so the MoE case
    sets its weight to 0.)"""
    from hanuman_jax.training.step import gradients

    runs, evals_by_accum = {}, {}
    for accum in (1, 4):
        cfg = _cfg(root, "--config.train.batch_size=8", f"--config.train.grad_accum_steps={accum}",
                   *moe)  # fmt: skip
        mesh = sharding.make_mesh(cfg.mesh)
        setup = build_setup(cfg, mesh)
        state, step = init_state(setup), jit_train_step(setup)
        grad_fn = jax.jit(lambda p, b, setup=setup: gradients(setup, p, b, jax.random.key(0)))
        history, grads = [], []
        for seed in range(3):
            batch = _batch(seed, b=8)
            batch["loss_mask"][seed, 3:9] = 0  # micro-batches with different target counts
            batch = sharding.global_batch(batch, mesh)
            if seed == 0:  # the same parameters in both runs
                grads.append(jax.device_get(grad_fn(state["params"], batch)[1]))
                evals = jax.device_get(jit_eval_step(setup)(state["params"], batch))
            state, metrics = step(state, batch)
            history.append({k: float(v) for k, v in metrics.items()})
        runs[accum] = history, grads, jax.device_get(state["params"])
        evals_by_accum[accum] = evals
    (one, grads_one, params_one), (four, grads_four, params_four) = runs[1], runs[4]
    # the evaluation runs in the same micro-batches, to the same sums
    assert int(evals_by_accum[4]["tokens"]) == int(evals_by_accum[1]["tokens"]) == 8 * 22 - 6
    assert float(evals_by_accum[4]["nll_sum"]) == pytest.approx(
        float(evals_by_accum[1]["nll_sum"]), rel=1e-6
    )
    for a, b in zip(one, four, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            if name == "aux_loss" or name.startswith("moe/load_"):
                continue  # balance statistics of each micro-batch, averaged: not the same
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-7), name
    for x, y in zip(jax.tree.leaves(grads_one), jax.tree.leaves(grads_four), strict=True):
        # within 1e-6 of each gradient's scale: the sums run in another order, and an element
        # near 0 has no meaningful relative error (this CPU's AVX-512 kernels showed 4e-6 there)
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6 * np.abs(x).max())
    # Adam divides by sqrt(v) + eps: where a gradient is near eps, rounding in the sums can move
    # that element's update by up to the learning rate. All others agree to 1e-3 relative.
    lr_sum = sum(h["lr"] for h in one)
    for x, y in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_four), strict=True):
        close = np.isclose(y, x, rtol=1e-3, atol=1e-5)
        assert close.mean() > 0.999 and np.abs(y - x).max() <= lr_sum


def test_grad_accumulation_must_split_every_shard(root):
    from hanuman_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.grad_accum_steps=4 .*must divide"):
        _cfg(root, "--config.train.batch_size=6", "--config.train.grad_accum_steps=4")


def _poisonable(monkeypatch):
    """Makes the loss NaN for a batch whose `poison` row values are NaN: a fault on purpose."""
    import hanuman_jax.training.step as step_module

    real = step_module.loss_fn

    def loss_fn(setup, params, batch, rng, **kw):
        batch = dict(batch)
        poison = batch.pop("poison")
        total, metrics = real(setup, params, batch, rng, **kw)
        return total + jnp.mean(poison), metrics

    monkeypatch.setattr(step_module, "loss_fn", loss_fn)


def test_nonfinite_step_changes_nothing_and_is_counted(root, monkeypatch):
    _poisonable(monkeypatch)
    cfg = _cfg(root)
    mesh = sharding.make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    state, step = init_state(setup), jit_train_step(setup)

    def run(state, poison):
        batch = _batch() | {"poison": np.full(4, poison, np.float32)}
        return step(state, sharding.global_batch(batch, mesh))

    state, _ = run(state, 0.0)
    before = jax.device_get({k: state[k] for k in ("params", "opt_state")})
    for n in (1, 2):
        state, metrics = run(state, np.nan)
        assert int(metrics["nonfinite_steps"]) == n and int(metrics["nonfinite_in_a_row"]) == n
        after = jax.device_get({k: state[k] for k in ("params", "opt_state")})
        for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
            np.testing.assert_array_equal(x, y)  # exactly unchanged
    state, metrics = run(state, 0.0)
    assert int(metrics["nonfinite_steps"]) == 2 and int(metrics["nonfinite_in_a_row"]) == 0
    assert int(state["step"]) == 4 and "loss_scale" not in metrics  # float32: no loss scale
    # optax counted 1 update before this one, not 3: the logged rate is the one it applied
    counts = {int(c) for c in jax.tree.leaves(state["opt_state"]) if c.dtype == jnp.int32}
    assert counts == {2}
    assert float(metrics["lr"]) == pytest.approx(float(setup.schedule(1)), rel=1e-6)


def test_nonfinite_gradient_under_a_finite_loss_is_skipped(root, monkeypatch):
    import hanuman_jax.training.step as step_module

    real = step_module.loss_fn

    def loss_fn(setup, params, batch, rng, **kw):  # + 0 x sqrt(0): the loss stays, d/dp is NaN
        total, metrics = real(setup, params, batch, rng, **kw)
        return total + 0.0 * jnp.sqrt(params["final_norm"]["scale"][3] - 1.0), metrics

    monkeypatch.setattr(step_module, "loss_fn", loss_fn)
    cfg = _cfg(root)
    mesh = sharding.make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    state, step = init_state(setup), jit_train_step(setup)
    before = jax.device_get(state["params"])
    state, metrics = step(state, sharding.global_batch(_batch(), mesh))
    assert np.isfinite(float(metrics["total_loss"]))
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["nonfinite_steps"]) == 1
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"]), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_float16_loss_scale_halves_on_overflow_and_regrows(root, monkeypatch):
    _poisonable(monkeypatch)
    cfg = _cfg(root, "--config.model.dtype=float16", "--config.optimizer.loss_scale=1024",
               "--config.optimizer.loss_scale_period=2")  # fmt: skip
    mesh = sharding.make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    state, step = init_state(setup), jit_train_step(setup)
    scales = []
    for poison in (0.0, np.inf, np.inf, 0.0, 0.0, 0.0):
        batch = _batch() | {"poison": np.full(4, poison, np.float32)}
        state, metrics = step(state, sharding.global_batch(batch, mesh))
        scales.append(float(metrics["loss_scale"]))
    assert scales == [1024, 512, 256, 256, 512, 512]


def test_float16_loss_scale_stops_growing_at_its_cap():
    from types import SimpleNamespace

    from hanuman_jax.config import MAX_LOSS_SCALE
    from hanuman_jax.training.step import _next_guard

    guard = {"nonfinite_steps": 0, "nonfinite_in_a_row": 0, "finite_in_a_row": 0,
             "loss_scale": jnp.float32(MAX_LOSS_SCALE / 2)}  # fmt: skip
    for _ in range(3):  # regrows after every finite step, to the cap and no further
        guard = _next_guard(SimpleNamespace(loss_scale_period=1), guard, jnp.bool_(True))
    assert float(guard["loss_scale"]) == MAX_LOSS_SCALE
    # a checkpoint from before the cap may hold inf: the first overflow brings it below the cap
    guard["loss_scale"] = jnp.float32(np.inf)
    guard = _next_guard(SimpleNamespace(loss_scale_period=1), guard, jnp.bool_(False))
    assert float(guard["loss_scale"]) == MAX_LOSS_SCALE / 2


def test_evaluation_runs_in_the_steps_micro_batches(root, monkeypatch):
    from hanuman_jax.training import step as step_module

    rows, real = [], step_module.loss_fn

    def recording(setup, params, batch, rng, **kw):
        rows.append(batch["tokens"].shape[0])  # at trace time
        return real(setup, params, batch, rng, **kw)

    monkeypatch.setattr(step_module, "loss_fn", recording)
    cfg = _cfg(root, "--config.train.batch_size=8", "--config.train.grad_accum_steps=4")
    mesh = sharding.make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    params = init_state(setup)["params"]
    jit_eval_step(setup)(params, sharding.global_batch(_batch(b=8), mesh))
    assert set(rows) == {2}  # 4 micro-batches of 2 rows, never the 8 at once


@pytest.mark.slow
def test_tiny_in_float16_ends_within_5_percent_of_float32(root):
    """The T4 path: tiny (2 layers, 64 tokens) for 60 steps on a fixed stream of batches."""
    final = {}
    for dtype in ("float32", "float16"):
        cfg = load_config(root / "configs" / "tiny.py", [
            f"--config.model.dtype={dtype}", "--config.model.vocab_size=512",
            "--config.model.num_layers=2", "--config.data.seq_len=64",
            "--config.train.batch_size=8", "--config.train.steps=60"])  # fmt: skip
        mesh = sharding.make_mesh(cfg.mesh)
        setup = build_setup(cfg, mesh)
        state, step = init_state(setup), jit_train_step(setup)
        rng = np.random.default_rng(0)
        pattern = rng.integers(0, 512, 997)  # a learnable, repeating "language"
        for _ in range(60):
            start = rng.integers(0, 997, 8)
            tokens = pattern[(start[:, None] + np.arange(64)) % 997].astype(np.int32)
            batch = {"tokens": tokens, "segment_ids": np.ones((8, 64), np.int32),
                     "positions": np.tile(np.arange(64, dtype=np.int32), (8, 1)),
                     "loss_mask": np.ones((8, 64), np.int32)}  # fmt: skip
            state, metrics = step(state, sharding.global_batch(batch, mesh))
        final[dtype] = float(metrics["loss"])
        if dtype == "float16":
            assert int(metrics["nonfinite_steps"]) < 60 and float(metrics["loss_scale"]) >= 1
    assert final["float32"] < 4.0  # it learned something: log(512) = 6.2
    assert final["float16"] == pytest.approx(final["float32"], rel=0.05), final
