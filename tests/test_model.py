import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model_cfg
from flax import nnx

from hanuman_jax.config import MoeConfig, RopeConfig
from hanuman_jax.model.transformer import Transformer, apply_rope, rope_inv_freq


def _tokens(b=3, t=17, vocab=103, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, vocab)


@pytest.mark.parametrize("moe", [MoeConfig(num_experts=0), MoeConfig(num_experts=5, top_k=2)])
@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_finite(moe, tie):
    cfg = small_model_cfg(moe=moe, tie_embeddings=tie)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(_tokens())
    assert logits.shape == (3, 17, 103)
    assert bool(jnp.all(jnp.isfinite(logits)))
    per_layer = {"load_max", "load_min", "router_entropy", "dropped"}
    assert set(aux) == ({"aux_loss", "z_loss", *per_layer} if moe.num_experts else set())
    for name in per_layer & set(aux):
        assert aux[name].shape == (cfg.num_layers,)


def test_jit_equals_no_jit(model_cfg):
    model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    tokens = _tokens()
    eager, _ = model(tokens)
    jitted, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


def test_causal(model_cfg):
    """Changing token t never changes the logits before t."""
    model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    tokens = _tokens(b=2, t=19)
    base, _ = model(tokens)
    for t in (0, 7, 18):
        changed = tokens.at[:, t].set((tokens[:, t] + 11) % 103)
        out, _ = model(changed)
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-5)
        assert not np.allclose(out[:, t], base[:, t], atol=1e-4)


def test_packed_documents_do_not_attend_to_each_other(model_cfg):
    """A document's logits are the same packed with others as alone."""
    model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    a, b, c = _tokens(1, 7, seed=2), _tokens(1, 5, seed=3), _tokens(1, 9, seed=4)
    packed = jnp.concatenate([a, b, c], axis=1)
    seg = jnp.array([[1] * 7 + [2] * 5 + [3] * 9])
    pos = jnp.array([list(range(7)) + list(range(5)) + list(range(9))])
    out, _ = nnx.jit(lambda m, *args: m(*args))(model, packed, seg, pos)
    for doc, sl in ((a, slice(0, 7)), (b, slice(7, 12)), (c, slice(12, 21))):
        alone, _ = nnx.jit(lambda m, t: m(t))(model, doc)
        np.testing.assert_allclose(out[:, sl], alone, atol=2e-5, rtol=1e-5)


def test_gqa_matches_repeated_kv_heads():
    """num_kv_heads < num_heads equals full MHA with each KV head repeated for its group."""
    gqa_cfg = small_model_cfg(moe=MoeConfig(num_experts=0))
    mha_cfg = small_model_cfg(moe=MoeConfig(num_experts=0), num_kv_heads=6)
    gqa = Transformer(gqa_cfg, rngs=nnx.Rngs(0))
    mha = Transformer(mha_cfg, rngs=nnx.Rngs(0))
    for g, m in zip(gqa.layers, mha.layers, strict=True):
        m.attn.wk[...] = jnp.repeat(g.attn.wk[...], 3, axis=1)
        m.attn.wv[...] = jnp.repeat(g.attn.wv[...], 3, axis=1)
        for name in ("wq", "wo"):
            getattr(m.attn, name)[...] = getattr(g.attn, name)[...]
        for name in ("w_gate", "w_up", "w_down"):
            getattr(m.mlp, name)[...] = getattr(g.mlp, name)[...]
    mha.embed[...] = gqa.embed[...]
    tokens = _tokens()
    np.testing.assert_allclose(gqa(tokens)[0], mha(tokens)[0], atol=1e-5)


def test_rope_is_relative():
    """q.k after RoPE depends only on the position difference."""
    inv = rope_inv_freq(8, RopeConfig())
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))

    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), inv)
        rk = apply_rope(k, jnp.array([[pk]]), inv)
        return float(jnp.sum(rq * rk))

    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


@pytest.mark.parametrize(
    "rope",
    [
        RopeConfig(theta=10_000.0),
        RopeConfig(theta=10_000.0, scaling="linear", factor=4.0),
        RopeConfig(theta=500_000.0, scaling="llama3", factor=8.0, original_context=8192),
        RopeConfig(
            theta=500_000.0,
            scaling="llama3",
            factor=2.0,
            original_context=4096,
            low_freq_factor=2.0,
            high_freq_factor=8.0,
        ),
    ],
    ids=["none", "linear", "llama3", "llama3-factors"],
)
def test_rope_frequencies_equal_transformers(rope):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "default" if rope.scaling == "none" else rope.scaling,
        "rope_theta": rope.theta,
    }
    if rope.scaling != "none":
        params["factor"] = rope.factor
    if rope.scaling == "llama3":
        params |= {
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_context,
        }
    hf = transformers.LlamaConfig(
        hidden_size=64 * 4,
        num_attention_heads=4,
        max_position_embeddings=16384,
        rope_parameters=params,
    )
    if rope.scaling == "none":
        want = 1.0 / rope.theta ** (np.arange(0, 64, 2) / 64)
    else:
        want = ROPE_INIT_FUNCTIONS[rope.scaling](hf, "cpu")[0].numpy()
    np.testing.assert_allclose(rope_inv_freq(64, rope), want, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
    cfg = small_model_cfg(dtype="bfloat16")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits, _ = model(_tokens())
    assert logits.dtype == jnp.float32  # the LM head accumulates in fp32 for the loss
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}


def _remat_step(moe, remat):
    tokens = _tokens(b=4, t=64, vocab=103)
    model = Transformer(small_model_cfg(moe=moe, remat=remat, num_layers=4), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.jit(jax.value_and_grad(loss)), params


REMAT_RUNS = """
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from test_model import _remat_step
from hanuman_jax.config import MoeConfig
out = {}
for experts in (0, 4):
    base = None
    for remat in ("none", "full", "save_matmuls"):
        step, params = _remat_step(MoeConfig(num_experts=experts, top_k=2), remat)
        temp = step.lower(params).compile().memory_analysis().temp_size_in_bytes
        loss, grads = step(params)
        base = base or (loss, grads)
        diffs = [float(np.max(np.abs(g - b) / (np.abs(b) + 1e-2)))
                 for g, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base[1]), strict=True)]
        out[f"{experts}/{remat}"] = {"temp": temp, "loss_diff": abs(float(loss - base[0])),
                                     "grad_rel_diff": max(diffs)}
print("RESULT" + json.dumps(out))
"""


def test_remat_keeps_loss_and_gradients_and_saves_memory(root):
    """`model.remat`, dense and MoE: the same loss and gradients, and XLA's own count of
    temporaries shrinks under the scheduler flag the CLI sets whenever remat is on (XLA:CPU's
    default scheduler undoes most of remat: see BENCHMARKS.md)."""
    from hanuman_jax.train import REMAT_CPU_FLAG

    env = {**os.environ, "XLA_FLAGS": REMAT_CPU_FLAG}
    proc = subprocess.run([sys.executable, "-c", REMAT_RUNS], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.split("RESULT", 1)[1])
    for experts in (0, 4):
        base = runs[f"{experts}/none"]["temp"]
        for remat in ("full", "save_matmuls"):
            run = runs[f"{experts}/{remat}"]
            assert run["loss_diff"] < 1e-6 and run["grad_rel_diff"] < 1e-4, runs
            assert run["temp"] < 0.8 * base, runs


def test_fused_attention_call_equals_ours():
    """The cuDNN branch's call (jax.nn.dot_product_attention, causal, masked to each packed
    document, GQA) run with implementation=xla equals our attention; auto means xla on CPU."""
    from hanuman_jax.config import ConfigError
    from hanuman_jax.model.attention import fused_attention
    from hanuman_jax.model.transformer import Attention
    from hanuman_jax.planning import targets
    from hanuman_jax.planning.targets import local_target

    cfg = small_model_cfg()
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    assert attn.kernel is None
    assert targets.attention_kernel(small_model_cfg(dtype="bfloat16"), local_target()) is None
    with pytest.raises(ConfigError, match="model.attention=cudnn cannot run here"):
        targets.attention_kernel(
            small_model_cfg(dtype="bfloat16", attention="cudnn"), local_target()
        )
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 21, cfg.d_model))
    seg = jnp.array([[1] * 7 + [2] * 5 + [3] * 9, [1] * 21])
    pos = jnp.array([list(range(7)) + list(range(5)) + list(range(9)), list(range(21))])
    ours, _ = attn(x, seg, pos)
    # the same projections and rotations as Attention.__call__, then the fused call
    inv = rope_inv_freq(cfg.hd, cfg.rope)
    q = apply_rope(jnp.einsum("BTD,DNH->BTNH", x, attn.wq[...]), pos, inv)
    k = apply_rope(jnp.einsum("BTD,DKH->BTKH", x, attn.wk[...]), pos, inv)
    v = jnp.einsum("BTD,DKH->BTKH", x, attn.wv[...])
    fused = jnp.einsum("BTNH,NHD->BTD", fused_attention(q, k, v, seg, "xla"), attn.wo[...])
    np.testing.assert_allclose(fused, ours, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("moe", [MoeConfig(num_experts=0), MoeConfig(num_experts=5, top_k=2)])
def test_cached_decode_equals_the_forward_without_cache(moe):
    """Left-padded prompts prefilled whole, then 2 tokens, then one at a time through the KV
    cache: each row's logits equal the plain forward of its real tokens alone (GQA: 6 query heads
    on 2 KV heads; 5 experts)."""
    from hanuman_jax.model.transformer import init_cache

    cfg = small_model_cfg(moe=moe)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    prompt, new, lengths = 7, 5, [7, 4, 1]  # real prompt tokens of each row, left-padded to 7
    tokens = _tokens(b=3, t=prompt + new)
    pad = jnp.array([prompt - n for n in lengths])
    decode = nnx.jit(lambda m, *args: m.decode(*args))
    positions = jnp.arange(prompt)[None] - pad[:, None]
    cache = init_cache(cfg, 3, prompt + new)
    first, cache = decode(model, tokens[:, :prompt], (positions >= 0).astype(jnp.int32),
                          jnp.maximum(positions, 0), cache)  # fmt: skip
    pieces = [first]
    for start, stop in [
        (prompt, prompt + 2),
        *((t, t + 1) for t in range(prompt + 2, prompt + new)),
    ]:
        positions = jnp.arange(start, stop)[None] - pad[:, None]
        logits, cache = decode(model, tokens[:, start:stop], jnp.ones_like(positions), positions,
                               cache)  # fmt: skip
        pieces.append(logits)
    cached = jnp.concatenate(pieces, axis=1)
    for row, p in enumerate(pad.tolist()):
        alone, _ = nnx.jit(lambda m, t: m(t))(model, tokens[row : row + 1, p:])
        np.testing.assert_allclose(cached[row, p:], alone[0], atol=2e-5, rtol=1e-5)
