"""The memory planner's stand-in for cuDNN flash attention: the same function and gradients as
XLA's attention, keeping only what JAX's cuDNN rule keeps; the planner using it; and which kernel
`model.attention` resolves to on a target."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model_cfg
from flax import nnx

from hanuman_jax.config import ConfigError, load_config
from hanuman_jax.model import attention, build
from hanuman_jax.model.attention import cudnn_attention, fused_attention
from hanuman_jax.planning import memory, targets
from hanuman_jax.planning.attention_stand_in import cudnn_stand_in
from hanuman_jax.planning.targets import Target, local_target, resolve_attention

H100 = Target("gpu", 9.0)


def _qkv(dtype=jnp.float32, b=2, t=19, n=6, kv=2, h=8):
    kq, kk, kv_ = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (b, t, n, h), dtype)
    k = jax.random.normal(kk, (b, t, kv, h), dtype)
    v = jax.random.normal(kv_, (b, t, kv, h), dtype)
    third = t // 3  # three packed documents in the first row, one in the second
    seg = jnp.array([[1] * third + [2] * third + [3] * (t - 2 * third), [1] * t])
    return q, k, v, seg


def test_attention_resolves_for_the_given_target():
    assert local_target().platform == "cpu"
    assert resolve_attention("auto", "bfloat16", 64, local_target()) == "xla"  # this CPU
    assert resolve_attention("auto", "bfloat16", 64, H100) == "cudnn"
    assert resolve_attention("auto", "float32", 64, H100) == "xla"  # cuDNN flash: bf16/fp16 only
    assert resolve_attention("auto", "bfloat16", 160, H100) == "xla"  # head_dim up to 128
    with pytest.raises(ConfigError, match="capability 7.5"):
        resolve_attention("cudnn", "float16", 64, Target("gpu", 7.5))  # a T4
    cfg = small_model_cfg(dtype="bfloat16")
    assert targets.attention_kernel(cfg, H100) is cudnn_attention
    assert targets.attention_kernel(cfg, local_target()) is None  # XLA's attention


def test_building_a_model_never_asks_for_devices(monkeypatch):
    """The kernel is resolved for a target the caller names: model code reads no device."""

    def no_devices(*args, **kwargs):
        raise AssertionError("jax.devices() called while building a model")

    monkeypatch.setattr(jax, "devices", no_devices)
    # a config no other test builds: the builder's cache has not seen it
    cfg = small_model_cfg(dtype="bfloat16", attention="cudnn", num_layers=1, d_model=96)
    graphdef, template = build.abstract_model(cfg, targets.attention_kernel(cfg, H100))
    params = build.init_params(cfg, jax.random.key(0))
    model = build.model_from_params(cfg, params, targets.attention_kernel(cfg, H100))
    assert model.layers[0].attn.kernel is cudnn_attention
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, nnx.to_pure_dict(template))


def test_cudnn_stand_in_equals_xla_attention_and_its_gradients():
    q, k, v, seg = _qkv()
    dout = jax.random.normal(jax.random.key(4), q.shape)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, seg) * dout)

    xla = functools.partial(fused_attention, implementation="xla")
    out = cudnn_stand_in(q, k, v, seg)
    grads = jax.grad(loss(cudnn_stand_in), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, xla(q, k, v, seg), atol=1e-5, rtol=1e-5)
    want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for got, ref in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_cudnn_stand_in_keeps_what_cudnn_keeps():
    q, k, v, seg = _qkv(jnp.bfloat16, t=64)
    b, t, n, h = q.shape
    kept = memory.residual_bytes(lambda q, k, v: cudnn_stand_in(q, k, v, seg), q, k, v)
    bias = b * t * t * 2  # the additive mask, bf16
    stats = b * n * t * 4  # log-sum-exp per query row and head, float32
    out = b * t * n * h * 2
    assert kept == bias + stats + out
    xla = memory.residual_bytes(lambda q, k, v: fused_attention(q, k, v, seg, "xla"), q, k, v)
    assert xla > kept + b * n * t * t * 2  # XLA keeps the T x T probabilities of every head


def test_planner_counts_flash_attention_on_gpus_that_run_it(root, capsys):
    cfg = load_config(root / "configs" / "tiny.py",
                      ["--config.model.vocab_size=512", "--config.model.num_layers=2",
                       "--config.model.dtype=bfloat16", "--config.data.seq_len=512",
                       "--config.train.batch_size=2"])  # fmt: skip
    t4 = memory.plan(cfg, 1, memory.DEVICES["t4"].target).activations
    h100 = memory.plan(cfg, 1, memory.DEVICES["h100"].target).activations
    # without remat every layer keeps its T x T probabilities (bf16) under XLA's attention
    layers, batch, heads, t = 2, 2, cfg.model.num_heads, 512
    assert t4 - h100 > layers * batch * heads * t * t * 2, (t4, h100)
    config = str(root / "configs" / "tiny.py")
    assert (
        memory.main(["--config", config, "--device", "h100", "--config.model.dtype=bfloat16"]) == 0
    )
    assert "attention cudnn" in capsys.readouterr().out
    # attention=cudnn cannot run on this CPU, but can be planned for a GPU that runs it
    assert memory.main(["--config", config, "--device", "a100", "--config.model.dtype=bfloat16",
                        "--config.model.attention=cudnn"]) == 0  # fmt: skip
    assert memory.main(["--config", config, "--device", "t4", "--config.model.dtype=float16",
                        "--config.model.attention=cudnn"]) == 2  # fmt: skip
    assert "model.attention=cudnn cannot run here (gpu, capability 7.5" in capsys.readouterr().err


@pytest.mark.parametrize(("t", "block"), [(24, 8), (19, 8), (24, 24)])  # 19: block does not divide
def test_blockwise_attention_equals_xla_attention_and_its_gradients(t, block):
    q, k, v, seg = _qkv(t=t)
    dout = jax.random.normal(jax.random.key(5), q.shape)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * dout)

    blockwise = lambda q, k, v: attention.blockwise_attention(q, k, v, seg, block)  # noqa: E731
    plain = lambda q, k, v: attention.xla_attention(q, k, v, seg)  # noqa: E731
    np.testing.assert_allclose(blockwise(q, k, v), plain(q, k, v), atol=1e-5, rtol=1e-5)
    got = jax.grad(loss(blockwise), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
    # bfloat16 (the backward's matmuls take the compute dtype): within bf16 rounding of float32
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    np.testing.assert_allclose(blockwise(*bf).astype(jnp.float32), plain(*bf).astype(jnp.float32),
                               atol=3e-2, rtol=3e-2)  # fmt: skip
    dout_bf = dout.astype(jnp.bfloat16)
    got_bf = jax.grad(lambda q, k, v: jnp.sum(blockwise(q, k, v).astype(jnp.float32) * dout_bf),
                      argnums=(0, 1, 2))(*bf)  # fmt: skip
    for g, w in zip(got_bf, want, strict=True):
        assert g.dtype == jnp.bfloat16
        rel = jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w)
        assert rel < 2e-2, rel


def test_blockwise_attention_holds_a_block_of_scores_not_all_of_them():
    b, t, n, kv, h = 4, 512, 4, 2, 32
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    k = jax.ShapeDtypeStruct((b, t, kv, h), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp(f):  # XLA's temporaries for forward + backward of one attention
        def fwd_bwd(q, k, v, seg, dout):
            return jax.vjp(lambda q, k, v: f(q, k, v, seg), q, k, v)[1](dout)

        compiled = jax.jit(fwd_bwd).lower(q, k, k, seg, q).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = temp(attention.xla_attention)
    blocks = temp(lambda q, k, v, seg: attention.blockwise_attention(q, k, v, seg, 64))
    scores = b * n * t * t * 4  # one float32 T x T array of every head
    assert plain > 3 * scores and blocks < scores, (plain, blocks, scores)
    # the residuals beside q, k, v (arguments): segment ids, the output, a float32 lse per row
    kept = memory.residual_bytes(
        lambda q, k, v: attention.blockwise_attention(q, k, v, jnp.ones((b, t), jnp.int32), 64),
        *(jnp.zeros(x.shape) for x in (q, k, k)),
    )
    assert kept == b * t * 4 + b * t * n * h * 4 + b * n * t * 4


def test_model_attention_block_keeps_loss_and_gradients(root):
    from hanuman_jax import sharding
    from hanuman_jax.training.step import build_setup, init_state, loss_fn

    def run(block):
        cfg = load_config(root / "configs" / "tiny.py",
                          ["--config.model.vocab_size=512", "--config.model.num_layers=2",
                           "--config.data.seq_len=64", "--config.train.batch_size=2",
                           f"--config.model.attention_block={block}"])  # fmt: skip
        setup = build_setup(cfg, sharding.make_mesh(cfg.mesh))
        params = init_state(setup)["params"]
        rng = np.random.default_rng(0)
        batch = {
            "tokens": jnp.asarray(rng.integers(0, 512, (2, 64)), jnp.int32),
            "segment_ids": jnp.asarray(np.repeat([[1] * 40 + [2] * 24], 2, 0), jnp.int32),
            "positions": jnp.asarray(np.repeat([list(range(40)) + list(range(24))], 2, 0)),
            "loss_mask": jnp.ones((2, 64), jnp.int32),
        }
        f = lambda p: loss_fn(setup, p, batch, None)[0]  # noqa: E731
        return jax.value_and_grad(f)(params)

    (loss0, g0), (loss16, g16) = run(0), run(16)
    np.testing.assert_allclose(loss16, loss0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_rows_no_longer_than_a_block_take_the_plain_attention(root):
    """One block would hold all T x T scores anyway: the plain attention runs, and is planned."""

    def activations(block, seq_len):
        cfg = load_config(root / "configs" / "tiny.py",
                          ["--config.model.vocab_size=512", "--config.model.num_layers=2",
                           f"--config.data.seq_len={seq_len}", "--config.train.batch_size=2",
                           f"--config.model.attention_block={block}"])  # fmt: skip
        return memory.plan(cfg, 1).activations

    assert activations(128, 128) == activations(0, 128)
    assert activations(64, 128) < activations(0, 128)


def test_odd_rows_take_xla_attention_under_auto_and_are_refused_under_cudnn(monkeypatch):
    """JAX's cuDNN rule trains a masked attention only on even row lengths."""

    def no_cudnn(*args):
        raise AssertionError("the fused kernel ran")

    monkeypatch.setattr(attention, "fused_attention", no_cudnn)  # what cudnn_attention calls

    tokens = jnp.ones((1, 9), jnp.int32)
    seg, pos = jnp.ones_like(tokens), jnp.arange(9)[None]
    auto_cfg = small_model_cfg(dtype="bfloat16")
    assert targets.attention_kernel(auto_cfg, H100) is cudnn_attention
    params = build.init_params(auto_cfg, jax.random.key(0))
    auto = build.model_from_params(auto_cfg, params, cudnn_attention)
    assert auto(tokens, seg, pos)[0].shape[:2] == (1, 9)
    cudnn_cfg = small_model_cfg(dtype="bfloat16", attention="cudnn")
    cudnn = build.model_from_params(cudnn_cfg, params, cudnn_attention)
    with pytest.raises(ConfigError, match="even row length"):
        cudnn(tokens, seg, pos)
    # even rows run the kernel the model was built with
    even = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(AssertionError, match="the fused kernel ran"):
        auto(even, jnp.ones_like(even), jnp.arange(8)[None])
