"""Pallas splash attention (the TPU kernel), run here in Pallas interpret mode: it equals XLA's
attention and its gradients with packed documents, padding and GQA; rows it cannot tile take XLA's
attention (or are refused when splash is asked for by name); it lowers for a TPU on this CPU; and
`model.attention` auto picks it on a TPU."""

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

from hanuman_jax.config import ConfigError, MoeConfig
from hanuman_jax.model import build
from hanuman_jax.model.attention import (
    cudnn_attention,
    splash_attention,
    splash_block,
    splash_kernel,
    xla_attention,
)
from hanuman_jax.planning import targets
from hanuman_jax.planning.targets import Target, resolve_attention

TPU, H100, T4, CPU = Target("tpu"), Target("gpu", 9.0), Target("gpu", 7.5), Target("cpu")
# float32, interpret mode: the kernel's online softmax differs from XLA's in rounding only
FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def _qkv(b, t, n, kv, h):
    kq, kk, kv_, kd = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(kq, (b, t, n, h))
    k = jax.random.normal(kk, (b, t, kv, h))
    v = jax.random.normal(kv_, (b, t, kv, h))
    dout = jax.random.normal(kd, q.shape)
    return q, k, v, dout


def _segments(b, t):
    """Row 0: three documents, then padding (segment 0); row 1: padding first, then one
    document; further rows: one document each."""
    rows = [[1] * 37 + [2] * 50 + [3] * (t - 97) + [0] * 10, [0] * 5 + [4] * (t - 5)]
    rows += [[1] * t] * (b - 2)
    return jnp.array(rows, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _outputs_and_grads(f, q, k, v, seg, dout):
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, seg), q, k, v)
    return out, vjp(dout)


def _assert_equal_to_xla(f, q, k, v, seg, dout):
    out, grads = _outputs_and_grads(f, q, k, v, seg, dout)
    want, want_grads = _outputs_and_grads(xla_attention, q, k, v, seg, dout)
    np.testing.assert_allclose(out, want, atol=FWD_TOL, rtol=FWD_TOL)
    for name, g, w in zip("qkv", grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=GRAD_TOL, rtol=GRAD_TOL, err_msg=f"d{name}")


@pytest.mark.parametrize(
    ("b", "t", "n", "kv", "h"),
    [(3, 128, 6, 2, 8), (2, 256, 3, 1, 16), (2, 128, 5, 5, 8)],  # GQA, one kv head, MHA
)
def test_splash_attention_equals_xla_attention_and_its_gradients(b, t, n, kv, h):
    q, k, v, dout = _qkv(b, t, n, kv, h)
    interpreted = lambda q, k, v, seg: splash_attention(q, k, v, seg, interpret=True)  # noqa: E731
    _assert_equal_to_xla(interpreted, q, k, v, _segments(b, t), dout)


def test_splash_attention_in_bfloat16_is_within_rounding_of_float32():
    """q is scaled by 1/sqrt(H) in bfloat16 before the kernel (it does not scale logits itself):
    outputs and gradients stay within bfloat16 rounding of the float32 reference (XLA's own
    bfloat16 attention is off by about 0.5 %)."""
    q, k, v, dout = _qkv(3, 128, 6, 2, 8)
    seg = _segments(3, 128)
    interpreted = lambda q, k, v, seg: splash_attention(q, k, v, seg, interpret=True)  # noqa: E731
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, dout)]
    got = jax.tree.leaves(_outputs_and_grads(interpreted, bf16[0], bf16[1], bf16[2], seg, bf16[3]))
    want = jax.tree.leaves(_outputs_and_grads(xla_attention, q, k, v, seg, dout))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        assert jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w) < 1e-2


def test_splash_block_is_the_largest_tile_that_divides_the_row():
    assert [splash_block(t) for t in (1024, 768, 384, 128, 96, 130)] == [512, 256, 128, 128, 0, 0]


@pytest.mark.parametrize("block", [0, 32])  # XLA's attention whole, or in blocks of 32 rows
def test_rows_splash_cannot_tile_take_xla_attention_under_auto(block):
    q, k, v, dout = _qkv(2, 96, 6, 2, 8)
    seg = jnp.array([[1] * 40 + [2] * 56, [1] * 90 + [0] * 6])
    _assert_equal_to_xla(splash_kernel(block, strict=False, interpret=True), q, k, v, seg, dout)
    with pytest.raises(ConfigError, match="model.attention=splash cannot run rows of 96 tokens"):
        splash_kernel(block, strict=True, interpret=True)(q, k, v, seg)


def test_auto_picks_splash_on_tpu_cudnn_on_new_gpus_and_xla_elsewhere():
    assert resolve_attention("auto", "bfloat16", 64, TPU) == "splash"
    assert resolve_attention("auto", "float32", 160, TPU) == "splash"
    assert resolve_attention("auto", "bfloat16", 64, H100) == "cudnn"
    assert resolve_attention("auto", "float32", 64, H100) == "xla"
    assert resolve_attention("auto", "float16", 64, T4) == "xla"
    assert resolve_attention("auto", "bfloat16", 64, CPU) == "xla"
    assert resolve_attention("splash", "float32", 64, TPU) == "splash"
    for target in (H100, T4, CPU):
        refused = rf"model.attention=splash cannot run here \({target.platform}\)"
        with pytest.raises(ConfigError, match=refused):
            resolve_attention("splash", "bfloat16", 64, target)
    with pytest.raises(ConfigError, match="model.attention=cudnn cannot run here \\(tpu"):
        resolve_attention("cudnn", "bfloat16", 64, TPU)


def test_attention_kernel_hands_the_model_splash_on_tpu():
    auto = small_model_cfg(attention_block=32)
    assert targets.attention_kernel(auto, TPU) is splash_kernel(32, strict=False)
    named = small_model_cfg(attention="splash")
    assert targets.attention_kernel(named, TPU) is splash_kernel(0, strict=True)
    assert targets.attention_kernel(small_model_cfg(dtype="bfloat16"), H100) is cudnn_attention
    assert targets.attention_kernel(auto, T4) is None
    assert targets.attention_kernel(auto, CPU) is None
    with pytest.raises(ConfigError, match="model.attention=splash cannot run here"):
        targets.attention_kernel(named, CPU)


def test_model_with_splash_equals_model_with_xla_attention():
    """The model's layout reaches the kernel as it expects: logits and parameter gradients."""
    cfg = small_model_cfg(num_layers=1, max_seq_len=128, moe=MoeConfig())  # a dense layer
    params = build.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, cfg.vocab_size)
    seg = _segments(2, 128)
    pos = jnp.concatenate([jnp.arange(128)[None], jnp.arange(128)[None]])

    def loss(kernel):
        def f(params):
            logits = build.model_from_params(cfg, params, kernel)(tokens, seg, pos)[0]
            return jnp.sum(jnp.sin(logits)), logits

        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (_, got), got_grads = loss(splash_kernel(0, strict=True, interpret=True))
    (_, want), want_grads = loss(None)
    np.testing.assert_allclose(got, want, atol=FWD_TOL, rtol=FWD_TOL)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, atol=GRAD_TOL, rtol=GRAD_TOL)


def test_splash_attention_forward_and_backward_lower_for_tpu():
    """No TPU here: jax.export lowers the Mosaic kernel for one (the TPU compiles it)."""
    q, k, v, dout = _qkv(2, 256, 6, 2, 8)
    seg = _segments(2, 256)
    kernel = splash_kernel(0, strict=True)  # not interpreted: the TPU kernel itself

    def fwd_bwd(q, k, v, seg, dout):
        return _outputs_and_grads(kernel, q, k, v, seg, dout)

    exported = jax.export.export(jax.jit(fwd_bwd), platforms=["tpu"])(q, k, v, seg, dout)
    assert exported.platforms == ("tpu",)
    text = exported.mlir_module()
    assert text.count("tpu_custom_call") == 3, text.count("tpu_custom_call")  # fwd, dq, dkv
    assert "splash" in text


SHARDED = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, ml_collections, numpy as np
    from test_splash import _outputs_and_grads, _qkv, _segments
    from hanuman_jax import sharding
    from hanuman_jax.model.attention import splash_attention, xla_attention

    q, k, v, dout = _qkv(4, 128, 6, 2, 8)
    seg = jnp.concatenate([_segments(2, 128)] * 2)
    f = lambda q, k, v, seg: splash_attention(q, k, v, seg, interpret=True)
    want = _outputs_and_grads(xla_attention, q, k, v, seg, dout)
    mesh = dict(data=2, fsdp=1, expert=1, tensor=2)
    jax.set_mesh(sharding.make_mesh(ml_collections.ConfigDict(mesh)))
    assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v, seg))  # the per-device path
    got = jax.jit(lambda *a: _outputs_and_grads(f, *a))(q, k, v, seg, dout)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    print("RESULT" + json.dumps({"diff": diff}))
    """
)


def test_splash_attention_runs_per_device_under_a_mesh(root):
    """Rows split over data, heads and kv heads over tensor (3 query heads over 1 kv head each)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.split("RESULT", 1)[1])["diff"] < GRAD_TOL
