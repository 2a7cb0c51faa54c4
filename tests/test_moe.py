import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model_cfg
from flax import nnx

from hanuman_jax.config import MoeConfig
from hanuman_jax.model.grouped import grouped_swiglu
from hanuman_jax.model.moe import MoEFeedForward, route


def _moe(impl="blocked", block_size=8, num_experts=5, top_k=2, dispatch="dropless", factor=1.25):
    cfg = small_model_cfg(
        moe=MoeConfig(
            num_experts=num_experts,
            top_k=top_k,
            router_temperature=1.2,
            grouped_matmul=impl,
            block_size=block_size,
            dispatch=dispatch,
            capacity_factor=factor,
        )
    )
    return MoEFeedForward(cfg, rngs=nnx.Rngs(3)), cfg


def _reference(moe: MoEFeedForward, x_BTD):
    """Every expert on every token, then the top-k combination: the definition, slowly."""
    m = moe.moe
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    probs = jax.nn.softmax((x_TD @ moe.router[...]) / m.router_temperature, axis=-1)
    top_w, top_e = jax.lax.top_k(probs, m.top_k)
    top_w = top_w / top_w.sum(-1, keepdims=True)
    out = jnp.zeros_like(x_TD)
    for e in range(m.num_experts):
        h = jax.nn.silu(x_TD @ moe.w_gate[e]) * (x_TD @ moe.w_up[e])
        y = h @ moe.w_down[e]
        w = jnp.sum(jnp.where(top_e == e, top_w, 0.0), axis=-1)
        out = out + w[:, None] * y
    return out.reshape(x_BTD.shape)


@pytest.mark.parametrize(
    ("impl", "dispatch"),
    [("blocked", "dropless"), ("ragged_dot", "dropless"), ("blocked", "capacity")],
)
def test_matches_loop_over_experts_forward_and_grad(impl, dispatch):
    # capacity_factor = experts / top_k gives every expert room for every token: nothing drops
    moe, _ = _moe(impl, dispatch=dispatch, factor=5 / 2)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 11, 48))
    valid = jnp.ones((3, 11), bool)
    out, aux = moe(x, valid_BT=valid)
    np.testing.assert_allclose(out, _reference(moe, x), atol=1e-5, rtol=1e-5)
    assert float(aux["dropped"]) == 0.0

    graphdef, params = nnx.split(moe, nnx.Param)

    def loss(params, fn):
        m = nnx.merge(graphdef, params)
        return jnp.sum(jnp.sin(fn(m, x)))

    got = jax.grad(loss)(params, lambda m, x: m(x, valid_BT=valid)[0])
    want = jax.grad(loss)(params, _reference)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_only_selected_experts_compute_each_token():
    """NaN weights in the experts a token did not select leave its output finite and unchanged:
    a dense implementation (0 x NaN = NaN) cannot pass this."""
    moe, _ = _moe()
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 48))
    valid = jnp.ones((1, 6), bool)
    base, _ = moe(x, valid_BT=valid)
    probs = jax.nn.softmax(x.reshape(6, 48) @ moe.router[...] / 1.2)
    chosen = np.asarray(jax.lax.top_k(probs, 2)[1])
    for t in range(6):
        other = jnp.array([e for e in range(5) if e not in chosen[t]])
        poisoned, _ = _moe()
        for name in ("w_gate", "w_up", "w_down"):
            w = getattr(poisoned, name)
            w[...] = w[...].at[other].set(jnp.nan)
        out, _ = poisoned(x, valid_BT=valid)
        np.testing.assert_array_equal(out[0, t], base[0, t])
        users = [s for s in range(6) if set(chosen[s]) & set(np.asarray(other).tolist())]
        assert np.isnan(np.asarray(out[0, users])).any()  # the poison is real where it is used


def test_grouped_kernels_equal_a_loop_with_empty_skewed_and_expertless_rows():
    """Outputs and gradients (the blocked kernel's backward is written by hand) of every row
    through its expert; expert index 6 of 6 is no expert: zero output, zero gradient."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
    wg, wu = (jnp.asarray(rng.normal(size=(6, 16, 24)) * 0.3, jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.normal(size=(6, 24, 16)) * 0.3, jnp.float32)
    cot = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)

    def reference(x, expert, wg, wu, wd):  # each row with its own expert's weights
        e = jnp.minimum(expert, 5)
        h = jax.nn.silu(jnp.einsum("RD,RDF->RF", x, wg[e])) * jnp.einsum("RD,RDF->RF", x, wu[e])
        return jnp.einsum("RF,RFD->RD", h, wd[e]) * (expert < 6)[:, None]

    def value_and_grads(fn, expert):
        loss = lambda x, wg, wu, wd: jnp.sum(fn(x, expert, wg, wu, wd) * cot)
        return fn(x, expert, wg, wu, wd), jax.grad(loss, argnums=(0, 1, 2, 3))(x, wg, wu, wd)

    for sizes in ([37, 0, 0, 0, 0, 0, 0], [0, 0, 20, 0, 17, 0, 0], [1, 9, 3, 0, 10, 9, 5]):
        expert = jnp.asarray(rng.permutation(np.repeat(np.arange(7), sizes)), jnp.int32)
        want, want_grads = value_and_grads(reference, expert)
        kernels = [("ragged_dot", 8)] + [("blocked", b) for b in (8, 16, 64)]
        for impl, block in kernels:
            fn = functools.partial(grouped_swiglu, impl=impl, block_size=block)
            got, grads = value_and_grads(fn, expert)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5, err_msg=impl)
            for g, w in zip(grads, want_grads, strict=True):
                np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5, err_msg=impl)
        assert not np.asarray(got)[np.asarray(expert) == 6].any()


def test_router_losses_and_weights():
    logits = jnp.zeros((10, 4))
    r = route(logits, jnp.ones(10, bool), top_k=2, temperature=1.2)
    assert float(r.aux["aux_loss"]) == pytest.approx(1.0, abs=1e-6)  # uniform: balanced
    assert float(r.aux["z_loss"]) == pytest.approx(np.log(4) ** 2, rel=1e-6)
    logits = jax.random.normal(jax.random.PRNGKey(0), (10, 4)) * 3
    r = route(logits, jnp.ones(10, bool), top_k=2, temperature=1.2)
    np.testing.assert_allclose(r.weights_TA.sum(-1), 1.0, rtol=1e-6)
    probs = jax.nn.softmax(logits / 1.2)
    np.testing.assert_array_equal(r.experts_TA, jax.lax.top_k(probs, 2)[1])
    # all tokens sent to one expert is maximally unbalanced: loss E * 1 * P_e > 1
    skewed = jnp.zeros((10, 4)).at[:, 0].set(10.0)
    r = route(skewed, jnp.ones(10, bool), top_k=1, temperature=1.0)
    assert float(r.aux["aux_loss"]) > 3.9


def test_padding_tokens_do_not_count_in_router_losses():
    logits = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    valid = jnp.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    masked = route(logits, valid, top_k=2, temperature=1.0)
    real = route(logits[:5], jnp.ones(5, bool), top_k=2, temperature=1.0)
    for k in ("aux_loss", "z_loss"):
        assert float(masked.aux[k]) == pytest.approx(float(real.aux[k]), rel=1e-6)


def test_capacity_drops_overflow_first_choices_first_and_counts_it():
    moe, _ = _moe(dispatch="capacity", factor=0.5)  # 33 tokens x 2 / 5 x 0.5: 7 slots each
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 11, 48))
    valid = jnp.ones((3, 11), bool).at[2, 8:].set(False)  # padding takes no slot
    out, aux = moe(x, valid_BT=valid)
    x_TD, valid_T = x.reshape(33, 48), np.asarray(valid).reshape(-1)
    routing = route(x_TD @ moe.router[...], valid.reshape(-1), top_k=2, temperature=1.2)
    experts = np.asarray(routing.experts_TA)
    weights = np.asarray(routing.weights_TA)
    kept = np.zeros((33, 2), bool)
    used = np.zeros(5, int)
    for k in range(2):  # the documented order: all first choices, then second, in token order
        for t in range(33):
            if valid_T[t] and used[experts[t, k]] < 7:
                kept[t, k] = True
                used[experts[t, k]] += 1
    assert (~kept[valid_T]).sum() > 0 and float(aux["dropped"]) == pytest.approx(
        (~kept[valid_T]).sum() / (2 * valid_T.sum())
    )
    want = np.zeros((33, 48), np.float32)
    for t in range(33):
        for k in range(2):
            if kept[t, k]:
                e = experts[t, k]
                h = jax.nn.silu(x_TD[t] @ moe.w_gate[e]) * (x_TD[t] @ moe.w_up[e])
                want[t] += weights[t, k] * np.asarray(h @ moe.w_down[e])
    np.testing.assert_allclose(np.asarray(out).reshape(33, 48), want, atol=1e-5, rtol=1e-5)


def test_per_layer_router_statistics():
    moe, _ = _moe()
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 16, 48))
    _, aux = moe(x, valid_BT=jnp.ones((2, 16), bool))
    assert 0 <= float(aux["load_min"]) <= 1 / 5 <= float(aux["load_max"]) <= 1
    assert 0 < float(aux["router_entropy"]) <= np.log(5) + 1e-6


EXPERT_PARALLEL = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, ml_collections, numpy as np
    from conftest import small_model_cfg
    from flax import nnx
    from hanuman_jax import sharding
    from hanuman_jax.config import MoeConfig
    from hanuman_jax.model.moe import MoEFeedForward

    x = jax.random.normal(jax.random.PRNGKey(0), (8, 11, 48))
    valid = jnp.ones((8, 11), bool).at[7, 4:].set(False)

    def moe(dispatch, factor):
        cfg = small_model_cfg(moe=MoeConfig(num_experts=8, top_k=3, router_temperature=1.2,
            block_size=8, dispatch=dispatch, capacity_factor=factor))
        return MoEFeedForward(cfg, rngs=nnx.Rngs(3))

    def run(layer, x, valid, mesh):
        # output, aux and gradients (parameters and input), jitted; mesh None: one device
        graphdef, params = nnx.split(layer, nnx.Param)
        def loss(params, x):
            y, aux = nnx.merge(graphdef, params)(x, valid_BT=valid)
            return jnp.sum(jnp.sin(y)) + aux["aux_loss"] + aux["z_loss"], (y, aux)
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        if mesh is None:
            jax.set_mesh(None)
            return jax.tree.map(np.asarray, fn(params, x)), ""
        jax.set_mesh(sharding.make_mesh(ml_collections.ConfigDict(mesh)))
        hlo = fn.lower(params, x).compile().as_text()
        return jax.tree.map(np.asarray, fn(params, x)), hlo

    def diff(a, b):  # within 1e-5 absolute or relative
        return max(float(np.max(np.abs(u - v) / (1 + np.abs(v))))
                   for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    out = {}
    meshes = {"data2_fsdp2_expert2": dict(data=2, fsdp=2, expert=2, tensor=1),
              "data2_expert4": dict(data=2, fsdp=1, expert=4, tensor=1),
              "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2)}
    for dispatch in ("dropless", "capacity"):
        layer = moe(dispatch, 8 / 3)  # capacity: every expert has room for every local token
        base, _ = run(layer, x, valid, None)
        for name, mesh in meshes.items():
            got, hlo = run(layer, x, valid, mesh)
            out[f"{name}/{dispatch}"] = {"diff": diff(got, base), "all_to_all": "all-to-all" in hlo,
                                         "dropped": float(got[0][1][1]["dropped"])}

    # Capacity under expert parallelism is per device: each of the 8 batch shards alone, on one
    # device, drops exactly what the sharded layer drops.
    layer = moe("capacity", 0.5)
    ((_, (y, aux)), _), _ = run(layer, x, valid, meshes["data2_fsdp2_expert2"])
    jax.set_mesh(None)
    want, dropped = [], 0.0
    for i in range(8):
        y_i, aux_i = layer(x[i : i + 1], valid_BT=valid[i : i + 1])
        want.append(np.asarray(y_i))
        dropped += float(aux_i["dropped"]) * int(valid[i].sum())
    out["per_shard"] = {"diff": diff(y, np.concatenate(want)), "dropped": float(aux["dropped"]),
                        "want_dropped": dropped / int(valid.sum())}
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_expert_parallel_matches_one_device_on_8_devices(root):
    """Tokens go to their experts' devices by all-to-all; output, losses and gradients are the
    one-device ones on three meshes, for both dispatch modes."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", EXPERT_PARALLEL], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    per_shard = out.pop("per_shard")
    for name, run in out.items():
        assert run["all_to_all"], name  # the expert-parallel path was taken
        assert run["diff"] < 1e-5 and run["dropped"] == 0.0, (name, run)
    assert per_shard["diff"] < 1e-5
    assert per_shard["dropped"] > 0
    assert per_shard["dropped"] == pytest.approx(per_shard["want_dropped"], rel=1e-6)
