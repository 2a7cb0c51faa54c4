import dataclasses
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
from jax.sharding import PartitionSpec as P

from hanuman_jax import sharding
from hanuman_jax.config import ConfigError, MoeConfig, load_config
from hanuman_jax.model import grouped
from hanuman_jax.model.build import inference_config
from hanuman_jax.model.grouped import grouped_swiglu
from hanuman_jax.model.moe import MoEFeedForward, route
from hanuman_jax.planning.targets import Target, grouped_matmul_impl
from hanuman_jax.training.step import build_setup

CPU, TPU, T4, H100 = Target("cpu"), Target("tpu"), Target("gpu", 7.5), Target("gpu", 9.0)


@pytest.fixture
def pallas_interpret(monkeypatch):
    """gmm, a TPU kernel, runs in Pallas interpret mode on this CPU."""
    monkeypatch.setattr(grouped, "INTERPRET", True)


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
    [("blocked", "dropless"), ("ragged_dot", "dropless"), ("gmm", "dropless"),
     ("blocked", "capacity")],
)  # fmt: skip
def test_matches_loop_over_experts_forward_and_grad(impl, dispatch, pallas_interpret):
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


def test_grouped_kernels_equal_a_loop_with_empty_skewed_and_expertless_rows(pallas_interpret):
    """Outputs and gradients (the blocked kernel's backward is written by hand, gmm's is
    megablox's) of every row through its expert, within 1e-4 of the float32 reference; expert
    index 6 of 6 is no expert: zero output, zero gradient."""
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
        kernels = [("ragged_dot", 8), ("gmm", 8)] + [("blocked", b) for b in (8, 16, 64)]
        for impl, block in kernels:
            fn = functools.partial(grouped_swiglu, impl=impl, block_size=block)
            got, grads = value_and_grads(fn, expert)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5, err_msg=impl)
            for g, w in zip(grads, want_grads, strict=True):
                np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5, err_msg=impl)
        assert not np.asarray(got)[np.asarray(expert) == 6].any()


def test_gmm_over_several_row_tiles_equals_blocked(pallas_interpret):
    """131 rows (two row tiles of 128, groups straddling them, padded to 256) and a hidden width
    past one tile (136): forward and gradients within 1e-4 of the blocked kernel."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(131, 20)), jnp.float32)
    wg, wu = (jnp.asarray(rng.normal(size=(5, 20, 136)) * 0.2, jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.normal(size=(5, 136, 20)) * 0.2, jnp.float32)
    expert = jnp.asarray(rng.permutation(np.repeat(np.arange(6), [40, 0, 61, 3, 20, 7])), jnp.int32)

    def value_and_grads(impl):
        fn = functools.partial(grouped_swiglu, impl=impl, block_size=16)
        loss = lambda x, *w: jnp.sum(jnp.sin(fn(x, expert, *w)))
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, wg, wu, wd)

    (got, grads), (want, want_grads) = value_and_grads("gmm"), value_and_grads("blocked")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5)


def test_gmm_forward_and_gradient_lower_for_tpu_on_this_cpu():
    """The TPU kernel itself (Mosaic, not interpret mode) lowers for a TPU here, in bfloat16 at
    widths that are not multiples of its 128 tile."""
    x = jax.ShapeDtypeStruct((37, 48), jnp.bfloat16)
    expert = jax.ShapeDtypeStruct((37,), jnp.int32)
    w_in = jax.ShapeDtypeStruct((5, 48, 40), jnp.bfloat16)
    w_out = jax.ShapeDtypeStruct((5, 40, 48), jnp.bfloat16)

    def loss(x, expert, wg, wu, wd):
        y = grouped_swiglu(x, expert, wg, wu, wd, impl="gmm", block_size=8)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4)))
    exported = jax.export.export(fn, platforms=["tpu"])(x, expert, w_in, w_in, w_out)
    # three gmm forward, and per gmm a gmm and a tgmm backward
    assert exported.mlir_module().count("tpu_custom_call") == 6


@pytest.mark.parametrize(
    ("requested", "dtype", "target", "want"),
    [("auto", "float32", CPU, "blocked"), ("auto", "bfloat16", TPU, "gmm"),
     ("auto", "float16", TPU, "ragged_dot"), ("auto", "float16", T4, "ragged_dot"),
     ("auto", "bfloat16", H100, "ragged_dot"), ("blocked", "bfloat16", TPU, "blocked"),
     ("ragged_dot", "bfloat16", TPU, "ragged_dot"), ("gmm", "float32", TPU, "gmm")],
)  # fmt: skip
def test_grouped_matmul_auto_and_named_kernels_per_target(requested, dtype, target, want):
    cfg = small_model_cfg(dtype=dtype, moe=MoeConfig(num_experts=5, grouped_matmul=requested))
    assert grouped_matmul_impl(cfg, target) == want


@pytest.mark.parametrize(
    ("requested", "dtype", "target", "why"),
    [("ragged_dot", "float32", CPU, "invalid on CPU: XLA:CPU lowers it to a dense product"),
     ("gmm", "float32", CPU, "cannot run on cpu: megablox gmm is a TPU kernel"),
     ("gmm", "bfloat16", H100, "cannot run on gpu: megablox gmm is a TPU kernel"),
     ("gmm", "float16", TPU, "cannot run with model.dtype=float16")],
)  # fmt: skip
def test_grouped_matmul_a_target_cannot_run_is_a_one_line_config_error(
    requested, dtype, target, why
):
    cfg = small_model_cfg(dtype=dtype, moe=MoeConfig(num_experts=5, grouped_matmul=requested))
    with pytest.raises(ConfigError, match=f"model.moe.grouped_matmul='{requested}'") as err:
        grouped_matmul_impl(cfg, target)
    assert why in str(err.value) and "\n" not in str(err.value)
    # a dense model runs no expert kernel: nothing to refuse
    dense = small_model_cfg(dtype=dtype, moe=MoeConfig(num_experts=0, grouped_matmul=requested))
    assert grouped_matmul_impl(dense, target) in ("blocked", "ragged_dot")
    # generation and evaluation take what the target has instead of refusing
    assert inference_config(cfg, target).moe.grouped_matmul == grouped_matmul_impl(
        dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, grouped_matmul="auto")), target
    )


@pytest.mark.parametrize(("target", "want"), [(CPU, "blocked"), (TPU, "gmm"), (H100, "ragged_dot")])
def test_setup_resolves_auto_once_for_its_target(root, target, want):
    """The model only ever sees a named kernel; ragged_dot on a CPU stops the setup."""
    cfg = load_config(root / "configs" / "tiny.py", ["--config.model.vocab_size=97"])
    assert cfg.model.moe.grouped_matmul == "auto"
    mesh = sharding.make_mesh(cfg.mesh)
    assert build_setup(cfg, mesh, target).model_cfg.moe.grouped_matmul == want
    cfg.model.moe.grouped_matmul = "ragged_dot"
    with pytest.raises(ConfigError, match="grouped_matmul='ragged_dot' is invalid on CPU"):
        build_setup(cfg, mesh)


def test_gmm_gives_way_where_a_mesh_splits_the_experts(pallas_interpret):
    """megablox's Pallas call cannot run inside the expert-parallel shard_map: auto takes
    ragged_dot on such a TPU mesh, and gmm named there is refused."""
    cfg = small_model_cfg(dtype="bfloat16", moe=MoeConfig(num_experts=4, grouped_matmul="auto"))
    assert grouped_matmul_impl(cfg, TPU, expert_parallel=True) == "ragged_dot"
    assert grouped_matmul_impl(cfg, TPU, expert_parallel=False) == "gmm"
    gmm = small_model_cfg(moe=MoeConfig(num_experts=4, grouped_matmul="gmm"))
    with pytest.raises(ConfigError, match="'gmm' cannot run with the experts split over devices"):
        grouped_matmul_impl(gmm, TPU, expert_parallel=True)
    # what the refusal prevents: the kernel inside shard_map, as expert parallelism runs it
    mesh = jax.make_mesh((1,), ("expert",), devices=jax.devices()[:1])
    run = jax.shard_map(
        functools.partial(grouped_swiglu, impl="gmm", block_size=8),
        mesh=mesh,
        in_specs=P(),
        out_specs=P(),
    )
    x, w = jnp.ones((8, 16)), jnp.ones((4, 16, 16))
    with pytest.raises(ValueError, match="check_vma"):
        run(x, jnp.zeros(8, jnp.int32), w, w, w)


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

    # a TPU setup on a mesh that splits the experts resolves auto to a kernel that runs there
    from hanuman_jax.config import load_config
    from hanuman_jax.planning.targets import Target
    from hanuman_jax.training.step import build_setup
    overrides = ["model.vocab_size=97", "model.dtype=bfloat16", "mesh.expert=2"]
    cfg = load_config("configs/tiny.py", [f"--config.{o}" for o in overrides])
    setup = build_setup(cfg, sharding.make_mesh(cfg.mesh), Target("tpu"))
    out["tpu_kernel"] = setup.model_cfg.moe.grouped_matmul
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
    assert out.pop("tpu_kernel") == "ragged_dot"  # gmm cannot run inside the shard_map
    for name, run in out.items():
        assert run["all_to_all"], name  # the expert-parallel path was taken
        assert run["diff"] < 1e-5 and run["dropped"] == 0.0, (name, run)
    assert per_shard["diff"] < 1e-5
    assert per_shard["dropped"] > 0
    assert per_shard["dropped"] == pytest.approx(per_shard["want_dropped"], rel=1e-6)


GMM_ON_A_MESH = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from hanuman_jax.model import grouped
    grouped.INTERPRET = True
    e_, d, f, r = 3, 16, 24, 4 * 21
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (r, d))
    expert = jax.random.randint(k[1], (r,), 0, e_ + 1)  # e_: rows without an expert
    w = [jax.random.normal(k[2], (e_, d, f)) * 0.2, jax.random.normal(k[3], (e_, d, f)) * 0.2,
         jax.random.normal(k[4], (e_, f, d)) * 0.2]
    probe = jnp.cos(jnp.arange(r * d).reshape(r, d))

    def loss(x, *w):
        y = grouped.grouped_swiglu(x, expert, *w, impl="gmm", block_size=64)
        return jnp.sum(y * probe)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    one = grad(x, *w)
    mesh = jax.make_mesh((2, 2, 1, 1), ("data", "fsdp", "expert", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"), None)))
        ws = [jax.device_put(a, NamedSharding(mesh, P(None, "fsdp"))) for a in w]
        text = grad.lower(xs, *ws).as_text()
        four = grad(xs, *ws)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(one), jax.tree.leaves(four)))
    print("RESULT" + json.dumps({"diff": diff, "manual": "manual" in text}))
    """
)


@pytest.mark.slow
def test_gmm_runs_per_device_under_a_mesh(root):
    """XLA cannot split a Pallas call: under a 4-device mesh gmm runs on each device's rows
    (shard_map) with the weights gathered, and the loss and every gradient equal one device's."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", GMM_ON_A_MESH], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["manual"], "gmm did not run inside a shard_map"
    assert out["diff"] < 1e-5, out
