"""Our parameters and config <-> Hugging Face Llama / Mistral / Mixtral, exactly.

The two models compute the same function; only the layout differs:
- attention `wq [D, N, H]` is `q_proj.weight [N*H, D]` (HF views its output as heads of H, and
  both use the `rotate_half` RoPE, so no permutation), likewise k, v, and `wo [N, H, D]`;
- a SwiGLU `w_gate/w_up [D, F]`, `w_down [F, D]` is `gate_proj/up_proj/down_proj` (dense) or, per
  expert, `w1/w3/w2` (Mixtral), transposed;
- the router: softmax(x @ router / T) over all experts, top-k, renormalised, which is Mixtral's
  router with `gate.weight = (router / T).T` (the temperature folded in);
- GQA: query head n reads key/value head n // (N / K) in both.
An MoE model's inference in HF is dropless: `dispatch=capacity` drops assignments only when a
training batch overflows an expert, and `jitter` is training noise, so neither changes the
exported function. Options a standard class cannot express are refused, never approximated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from hanuman_jax.config import ConfigError, ModelConfig, MoeConfig, RopeConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM"}  # fmt: skip
# what transformers assumes when config.json omits a key (its config classes' defaults)
HF_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "max_position_embeddings": 2048,
              "sliding_window": None},
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "max_position_embeddings": 131072,
                "sliding_window": 4096},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 131072,
                "sliding_window": None, "num_local_experts": 8, "num_experts_per_tok": 2},
}  # fmt: skip
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
Tensors = Iterator[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]]


def check_exportable(cfg: ModelConfig) -> None:
    """Refuses a model that no standard class computes exactly."""
    if cfg.rope.scaling not in ("none", "linear", "llama3"):
        raise ConfigError(
            f"model.rope.scaling={cfg.rope.scaling!r} has no exact Hugging Face equivalent; "
            "exportable: none, linear, llama3"
        )


def _rope_parameters(rope: RopeConfig) -> dict:
    if rope.scaling == "none":
        return {"rope_type": "default", "rope_theta": rope.theta}
    out = {"rope_type": rope.scaling, "rope_theta": rope.theta, "factor": rope.factor}
    if rope.scaling == "llama3":
        out |= {
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_context,
        }
    return out


def hf_config(cfg: ModelConfig, *, bos: int, eos: int, pad: int | None, dtype: str) -> dict:
    """config.json for `MixtralForCausalLM` (MoE) or `LlamaForCausalLM` (dense), with every key
    set so that no class default matters. RoPE appears both as transformers 4's `rope_theta` +
    `rope_scaling` and as transformers 5's `rope_parameters`: each version reads its own."""
    check_exportable(cfg)
    rope = _rope_parameters(cfg.rope)
    scaling = None if cfg.rope.scaling == "none" else {k: v for k, v in rope.items()
                                                      if k != "rope_theta"}  # fmt: skip
    out = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.hd,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope.theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if cfg.moe.num_experts:
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **out,
            "sliding_window": None,
            "num_local_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.top_k,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "router_aux_loss_coef": cfg.moe.aux_loss_coef,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **out,
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
    }


def _refuse(hf: dict, what: str) -> ConfigError:
    kind = hf.get("architectures", [hf.get("model_type")])
    return ConfigError(f"cannot import this {kind} model exactly: {what}")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Our config for a Llama / Mistral / Mixtral config.json; raises on anything else."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConfigError(
            f"config.json model_type={kind!r} is not supported; importable: "
            f"{', '.join(ARCHITECTURES)} (and our own exports)"
        )
    get = {**HF_DEFAULTS[kind], **hf}.get
    if get("hidden_act", "silu") != "silu":
        raise _refuse(hf, f"hidden_act={get('hidden_act')!r} (only silu: SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if get(key, False):
            raise _refuse(hf, f"{key}=true (our layers have no biases)")
    window = get("sliding_window")
    if (
        window is not None
        and get("use_sliding_window", True)
        and window < get("max_position_embeddings")
    ):
        raise _refuse(hf, f"sliding_window={window} (our attention is full causal)")
    if get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(hf, f"partial_rotary_factor={get('partial_rotary_factor')}")
    # transformers 5 writes rope_parameters; 4 writes rope_theta and rope_scaling (it wins in 5)
    rope_hf = dict(get("rope_scaling") or get("rope_parameters") or {})
    rope_type = rope_hf.get("rope_type", rope_hf.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _refuse(hf, f"rope type {rope_type!r} (importable: {', '.join(ROPE_TYPES)})")
    theta = float(rope_hf.get("rope_theta", get("rope_theta")))
    max_len = int(get("max_position_embeddings"))
    rope = RopeConfig(theta=theta, scaling=ROPE_TYPES[rope_type])
    if rope_type != "default":
        rope = dataclasses.replace(rope, factor=float(rope_hf["factor"]))
    if rope_type == "llama3":
        rope = dataclasses.replace(
            rope,
            original_context=int(rope_hf.get("original_max_position_embeddings", max_len)),
            low_freq_factor=float(rope_hf["low_freq_factor"]),
            high_freq_factor=float(rope_hf["high_freq_factor"]),
        )
    moe = MoeConfig()
    if kind == "mixtral":
        moe = MoeConfig(
            num_experts=int(get("num_local_experts")),
            top_k=int(get("num_experts_per_tok")),
            router_temperature=1.0,
        )
    d, n = int(get("hidden_size")), int(get("num_attention_heads"))
    head_dim = int(get("head_dim") or d // n)
    return ModelConfig(
        vocab_size=int(get("vocab_size")),
        num_layers=int(get("num_hidden_layers")),
        d_model=d,
        num_heads=n,
        num_kv_heads=int(get("num_key_value_heads") or n),
        ffn_hidden=int(get("intermediate_size")),
        max_seq_len=max_len,
        head_dim=0 if head_dim * n == d else head_dim,
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        norm_eps=float(get("rms_norm_eps")),
        init_std=float(get("initializer_range", 0.02)),
        rope=rope,
        moe=moe,
    )


def _layer_names(cfg: ModelConfig, i: int) -> dict[str, tuple[str, ...]]:
    """HF name -> path in our params of one layer's tensors (all but the router and experts)."""
    p = f"model.layers.{i}."
    names = {
        p + "input_layernorm.weight": ("attn_norm", "scale"),
        p + "post_attention_layernorm.weight": ("ffn_norm", "scale"),
        p + "self_attn.q_proj.weight": ("attn", "wq"),
        p + "self_attn.k_proj.weight": ("attn", "wk"),
        p + "self_attn.v_proj.weight": ("attn", "wv"),
        p + "self_attn.o_proj.weight": ("attn", "wo"),
    }
    if not cfg.moe.num_experts:
        names |= {
            p + "mlp.gate_proj.weight": ("mlp", "w_gate"),
            p + "mlp.up_proj.weight": ("mlp", "w_up"),
            p + "mlp.down_proj.weight": ("mlp", "w_down"),
        }
    return names


EXPERT_NAMES = {"w1": "w_gate", "w3": "w_up", "w2": "w_down"}


def _hf_shape(shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
    """The [out, in] shape HF gives one of our tensors (norm scales are the same vectors)."""
    if path[-1] == "scale":
        return tuple(shape)
    if path[-1] == "wo":  # [N, H, D]
        return (shape[-1], int(np.prod(shape[:-1])))
    return (int(np.prod(shape[1:])), shape[0])  # wq/wk/wv [D, N, H]; w_* [D, F] or [F, D]


def _to_hf_layout(ours: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-1] == "scale":
        return ours
    return ours.reshape(_hf_shape(ours.shape, path)[::-1]).T


def _from_hf_layout(hf: np.ndarray, shape: tuple[int, ...], path: tuple[str, ...]) -> np.ndarray:
    return hf if path[-1] == "scale" else hf.T.reshape(shape)


def hf_tensors(params: dict, cfg: ModelConfig) -> Tensors:
    """(HF name, loader of the float32 tensor, its shape) for every tensor, in HF's order; each
    loader reads only its own tensor from `params` (which may be on any device or mesh)."""

    def f32(x) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    yield "model.embed_tokens.weight", lambda: f32(params["embed"]), tuple(params["embed"].shape)
    for i in range(cfg.num_layers):
        layer = params["layers"][i]
        for name, path in _layer_names(cfg, i).items():
            x = layer[path[0]][path[1]]
            yield name, lambda x=x, path=path: _to_hf_layout(f32(x), path), _hf_shape(x.shape, path)
        if cfg.moe.num_experts:
            moe, p = layer["moe"], f"model.layers.{i}.block_sparse_moe."
            router, temperature = moe["router"], np.float32(cfg.moe.router_temperature)
            yield (p + "gate.weight", lambda r=router, t=temperature: (f32(r) / t).T,
                   tuple(router.shape[::-1]))  # fmt: skip
            for e in range(cfg.moe.num_experts):
                for hf_name, ours in EXPERT_NAMES.items():
                    w = moe[ours]
                    yield (f"{p}experts.{e}.{hf_name}.weight", lambda w=w, e=e: f32(w[e]).T,
                           tuple(w.shape[1:][::-1]))  # fmt: skip
    scale = params["final_norm"]["scale"]
    yield "model.norm.weight", lambda: f32(scale), tuple(scale.shape)
    if not cfg.tie_embeddings:
        head = params["lm_head"]
        yield "lm_head.weight", lambda: f32(head).T, tuple(head.shape[::-1])


def params_from_hf(
    get: Callable[[str], np.ndarray], cfg: ModelConfig, abstract: dict
) -> tuple[dict, set[str]]:
    """Our params (float32 numpy, the structure of `abstract`) from HF tensors read by `get`,
    and the HF names read."""
    used: set[str] = set()

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        x = np.asarray(get(name), np.float32)
        if tuple(x.shape) != tuple(shape):
            raise ConfigError(f"tensor {name} has shape {tuple(x.shape)}, expected {shape}")
        return x

    def shape(x) -> tuple[int, ...]:
        return tuple(x.shape)

    embed = abstract["embed"]
    params: dict = {"embed": read("model.embed_tokens.weight", shape(embed)), "layers": {}}
    for i in range(cfg.num_layers):
        ours = abstract["layers"][i]
        layer: dict = {k: {} for k in ours}
        for name, path in _layer_names(cfg, i).items():
            target = shape(ours[path[0]][path[1]])
            hf = read(name, _hf_shape(target, path))
            layer[path[0]][path[1]] = _from_hf_layout(hf, target, path)
        if cfg.moe.num_experts:
            p = f"model.layers.{i}.block_sparse_moe."
            router = ours["moe"]["router"]
            layer["moe"]["router"] = read(p + "gate.weight", shape(router)[::-1]).T
            for hf_name, name in EXPERT_NAMES.items():
                e_shape = shape(ours["moe"][name])[1:]
                layer["moe"][name] = np.stack([
                    read(f"{p}experts.{e}.{hf_name}.weight", e_shape[::-1]).T
                    for e in range(cfg.moe.num_experts)
                ])  # fmt: skip
        params["layers"][i] = layer
    params["final_norm"] = {"scale": read("model.norm.weight", (cfg.d_model,))}
    if not cfg.tie_embeddings:
        params["lm_head"] = read("lm_head.weight", shape(abstract["lm_head"])[::-1]).T
    return params, used
