import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hanuman_jax.training.cross_entropy import (
    MAX_CHUNK_LOGITS_BYTES,
    chunk_plan,
    chunks_for,
    linear_cross_entropy,
)


def _plain(h_BTD, w_VD, target_BT, weight_BT):
    logits = jnp.einsum("BTD,VD->BTV", h_BTD.astype(jnp.float32), w_VD.astype(jnp.float32))
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, target_BT[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * weight_BT)


def _inputs(dtype=jnp.float32, b=6, t=7, d=24, v=53):
    keys = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(keys[0], (b, t, d)).astype(dtype)
    w = (jax.random.normal(keys[1], (v, d)) * 0.3).astype(dtype)
    target = jax.random.randint(keys[2], (b, t), 0, v)
    mask = (jax.random.uniform(keys[3], (b, t)) > 0.3).astype(jnp.float32)
    return h, w, target, mask / mask.sum()


@pytest.mark.parametrize("chunks", [1, 2, 3, 6])
def test_equals_the_plain_loss_and_its_gradients(chunks):
    h, w, target, weight = _inputs()
    want, (dh_want, dw_want) = jax.value_and_grad(_plain, argnums=(0, 1))(h, w, target, weight)
    got, (dh, dw) = jax.jit(
        jax.value_and_grad(
            lambda h, w: linear_cross_entropy(h, w, target, weight, chunks=chunks), argnums=(0, 1)
        )
    )(h, w)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(dh, dh_want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, dw_want, rtol=1e-5, atol=1e-7)
    assert not np.any(dh[weight == 0])  # untrained positions get no gradient


def test_float16_gradients_are_scaled_before_they_are_rounded():
    """Under float16 the cotangent is the loss scale; unscaled, 1 / 100k-target gradients would
    flush to zero in float16 before it is applied."""
    h, w, target, _ = _inputs(jnp.float16)
    weight = jnp.full(target.shape, 1e-5, jnp.float32)  # a 100k-target batch's per-target weight
    scale = 2.0**15
    dh = jax.grad(lambda h: scale * linear_cross_entropy(h, w, target, weight, chunks=2))(h)
    dh_want = jax.grad(lambda h: scale * _plain(h, w.astype(jnp.float32), target, weight))(
        h.astype(jnp.float32)
    )
    assert dh.dtype == jnp.float16
    np.testing.assert_allclose(dh.astype(jnp.float32), dh_want, rtol=2e-2, atol=1e-4)
    assert np.count_nonzero(dh) > 0.99 * dh.size


def test_chunks_are_whole_sequences_of_at_least_the_minimum_on_every_shard():
    assert chunks_for(8, 255, 1, 128) == 8  # bench_s: one sequence of 255 rows per chunk
    assert chunks_for(8, 255, 2, 128) == 4  # 2 batch shards: 2 sequences per chunk
    assert chunks_for(8, 255, 1, 600) == 2  # 4 sequences reach 600 rows
    assert chunks_for(2, 8191, 1, 4096) == 2
    assert chunks_for(1, 127, 1, 4096) == 1  # never fewer than one


@pytest.mark.parametrize(("pieces", "chunks"), [(2, 1), (3, 2), (3, 9), (7, 6)])
def test_sequences_cut_into_pieces_give_the_same_loss_and_gradients(pieces, chunks):
    # t = 7: 2 and 3 pieces pad the sequences with untrained positions, 7 pieces are 1 token each
    h, w, target, weight = _inputs(b=6, t=7)
    want, (dh_want, dw_want) = jax.value_and_grad(_plain, argnums=(0, 1))(h, w, target, weight)

    def loss(h, w):
        return linear_cross_entropy(h, w, target, weight, chunks=chunks, pieces=pieces)

    got, (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, w)
    assert dh.shape == h.shape
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(dh, dh_want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, dw_want, rtol=1e-5, atol=1e-7)


def test_long_sequences_of_a_large_vocabulary_are_cut_to_bound_the_logits():
    # bench_s and tiny: whole sequences, as chunks_for picks them; rows per chunk per device
    assert chunk_plan(8, 255, 8000, 1, 128) == (1, 8, 255)
    assert chunk_plan(16, 127, 4096, 2, 128) == (1, 4, 254)
    # the recipe at 8k: one sequence's logits would be 3.1 GB; 6 pieces of 1,366 targets
    assert chunk_plan(1, 8191, 96_000, 1, 4096) == (6, 6, 1366)
    # short sequences of a large vocabulary: whole, but no more than the cap needs
    pieces, chunks, rows = chunk_plan(8, 1000, 96_000, 1, 4096)
    assert (pieces, chunks) == (1, 4) and rows * 96_000 * 4 <= 2 * MAX_CHUNK_LOGITS_BYTES
    for b, t, shards in [(64, 2047, 8), (16, 8191, 4), (32, 255, 2)]:
        plan = chunk_plan(b, t, 96_000, shards, 4096)
        assert plan[2] * 96_000 * 4 <= 2 * MAX_CHUNK_LOGITS_BYTES, plan
        # the step plans the global batch over its shards, the planner one device's share
        assert plan == chunk_plan(b // shards, t, 96_000, 1, 4096), (b, t, shards)


def test_train_loss_is_the_same_when_sequences_are_cut(root, monkeypatch):
    from hanuman_jax import sharding
    from hanuman_jax.config import load_config
    from hanuman_jax.training import cross_entropy
    from hanuman_jax.training.step import build_setup, init_state, loss_fn

    cfg = load_config(root / "configs" / "tiny.py",
                      ["--config.model.vocab_size=512", "--config.model.num_layers=1",
                       "--config.data.seq_len=64", "--config.train.batch_size=2"])  # fmt: skip
    setup = build_setup(cfg, sharding.make_mesh(cfg.mesh))
    params = init_state(setup)["params"]
    rng = np.random.default_rng(0)
    batch = {
        "tokens": jnp.asarray(rng.integers(0, 512, (2, 64)), jnp.int32),
        "segment_ids": jnp.ones((2, 64), jnp.int32),
        "positions": jnp.tile(jnp.arange(64, dtype=jnp.int32), (2, 1)),
        "loss_mask": jnp.ones((2, 64), jnp.int32),
    }
    run = jax.value_and_grad(lambda p: loss_fn(setup, p, batch, None)[0])
    whole, g_whole = run(params)
    # room for 20 rows of logits: each sequence of 63 targets in 4 pieces of 16 (one padded)
    monkeypatch.setattr(cross_entropy, "MAX_CHUNK_LOGITS_BYTES", 20 * 512 * 4)
    assert chunk_plan(2, 63, 512, 1, setup.loss_chunk_rows)[0] == 4
    cut, g_cut = run(params)
    np.testing.assert_allclose(cut, whole, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_cut), jax.tree.leaves(g_whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
