"""Text generation with a KV cache under jax.jit: greedy (temperature 0), or sampling with
temperature, top-k and top-p.

python -m hanuman_jax.generate --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
    [--top-k K] [--top-p P] [--seed S] [--chat]

The cached decode reuses the model's own modules (norms, feed-forward, MoE, RoPE); only the
attention is rewritten here, to read and extend the cache. Prompts are left-padded to a common
length: padded keys are masked, and positions count from each prompt's first token.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hanuman_jax.config import ConfigError, ModelConfig
from hanuman_jax.data import DataError
from hanuman_jax.model.layers import project
from hanuman_jax.model.transformer import Attention, Transformer, apply_rope, rope_inv_freq
from hanuman_jax.tokenizer import Tokenizer

Array = jax.Array
PROMPT_BUCKET = 16  # prompt lengths are rounded up to this: fewer compilations
MAX_STOP_IDS = 8  # stop ids travel as a fixed-size array: changing them does not recompile


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """The model as it runs outside training: dropless MoE (capacity drops assignments only in
    training), no router noise, no rematerialisation, kernels this backend has."""
    moe = dataclasses.replace(cfg.moe, dispatch="dropless", jitter=0.0)
    if jax.default_backend() == "cpu":
        moe = dataclasses.replace(moe, grouped_matmul="blocked")
    attention = "auto" if cfg.attention == "cudnn" else cfg.attention
    return dataclasses.replace(cfg, moe=moe, remat="none", attention=attention)


@functools.lru_cache(maxsize=8)
def _graph(cfg: ModelConfig):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)


def build_model(params: dict, cfg: ModelConfig) -> Transformer:
    """The model holding `params` (traced or concrete), built as `cfg` says."""
    graphdef, template = _graph(cfg)
    state = jax.tree.map(lambda v: v, template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _attend(attn: Attention, x_BTD, positions_BT, cache, slot, key_ok_BS):
    """Attention of T new tokens at cache slots slot..slot+T-1; returns output and new cache."""
    dt = attn.dtype
    q_BTNH = project(x_BTD, attn.wq[...].astype(dt))
    k_BTKH = project(x_BTD, attn.wk[...].astype(dt))
    v_BTKH = project(x_BTD, attn.wv[...].astype(dt))
    inv_freq = rope_inv_freq(q_BTNH.shape[-1], attn.rope)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)
    k_BSKH = jax.lax.dynamic_update_slice(cache[0], k_BTKH.astype(cache[0].dtype), (0, slot, 0, 0))
    v_BSKH = jax.lax.dynamic_update_slice(cache[1], v_BTKH.astype(cache[1].dtype), (0, slot, 0, 0))
    b, t, n, h = q_BTNH.shape
    s, kv = k_BSKH.shape[1], attn.num_kv_heads
    q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
    logits_BKGTS = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
    ) / math.sqrt(h)
    causal_TS = jnp.arange(s)[None, :] <= slot + jnp.arange(t)[:, None]
    mask_B11TS = (key_ok_BS[:, None, :] & causal_TS[None])[:, None, None]
    logits_BKGTS = jnp.where(mask_B11TS, logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dt)
    out_BTNH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH).reshape(b, t, n, h)
    return project(out_BTNH, attn.wo[...].astype(dt), contract=2), (k_BSKH, v_BSKH)


def forward_cached(model: Transformer, tokens_BT, positions_BT, valid_BT, cache, slot, key_ok_BS):
    """Logits of T new tokens written at cache slots slot..slot+T-1, and the new cache (one
    (k, v) per layer); `key_ok_BS` marks the slots that hold real (not padding) tokens."""
    cfg = model.cfg
    dt = jnp.dtype(cfg.dtype)
    x_BTD = jnp.take(model.embed[...], tokens_BT, axis=0).astype(dt)
    new_cache = []
    for block, layer_cache in zip(model.layers, cache, strict=True):
        out_BTD, layer_cache = _attend(
            block.attn, block.attn_norm(x_BTD), positions_BT, layer_cache, slot, key_ok_BS
        )
        x_BTD = x_BTD + out_BTD
        h_BTD = block.ffn_norm(x_BTD)
        if hasattr(block, "moe"):
            out_BTD, _ = block.moe(h_BTD, valid_BT=valid_BT)
        else:
            out_BTD = block.mlp(h_BTD)
        x_BTD = x_BTD + out_BTD
        new_cache.append(layer_cache)
    x_BTD = model.final_norm(x_BTD)
    head = model.embed[...].T if cfg.tie_embeddings else model.lm_head[...]
    logits_BTV = project(x_BTD, head.astype(dt), preferred_element_type=jnp.float32)
    return logits_BTV, new_cache


def choose(logits_BV, rng, temperature, top_p, *, greedy: bool, top_k: int, nucleus: bool):
    """The next token: argmax, or a sample from the tempered, top-k and top-p truncated logits."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if nucleus:  # the most likely tokens whose mass reaches top_p (always at least one)
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        cutoff_B1 = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), -1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _compiled(cfg: ModelConfig, prompt_len: int, max_new: int, greedy: bool, top_k: int,
              nucleus: bool):  # fmt: skip
    """The whole generation as one jitted function: prefill, then a while loop of single-token
    steps that ends when every sequence has stopped or max_new tokens are out."""
    pick = functools.partial(choose, greedy=greedy, top_k=top_k, nucleus=nucleus)

    def run(params, tokens_BP, pad_B, stops, rng, temperature, top_p):
        model = build_model(params, cfg)
        b, s = tokens_BP.shape[0], prompt_len + max_new
        dt = jnp.dtype(cfg.dtype)
        cache = [(jnp.zeros((b, s, cfg.num_kv_heads, cfg.hd), dt),) * 2] * cfg.num_layers
        key_ok_BS = jnp.arange(s)[None, :] >= pad_B[:, None]
        positions_BP = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad_B[:, None], 0)
        logits_BPV, cache = forward_cached(
            model, tokens_BP, positions_BP, key_ok_BS[:, :prompt_len], cache, 0, key_ok_BS
        )
        first_B = pick(logits_BPV[:, -1], jax.random.fold_in(rng, 0), temperature, top_p)

        def more(state):
            step, _, _, _, done_B = state
            return (step < max_new) & ~jnp.all(done_B)

        def one(state):
            step, cache, token_B, out_BN, done_B = state
            out_BN = out_BN.at[:, step].set(jnp.where(done_B, -1, token_B))
            done_B = done_B | jnp.isin(token_B, stops)
            slot = prompt_len + step
            logits_B1V, cache = forward_cached(
                model, token_B[:, None], (slot - pad_B)[:, None], ~done_B[:, None], cache, slot,
                key_ok_BS,
            )  # fmt: skip
            token_B = pick(logits_B1V[:, 0], jax.random.fold_in(rng, step + 1), temperature, top_p)
            return step + 1, cache, token_B, out_BN, done_B

        out_BN = jnp.full((b, max_new), -1, jnp.int32)
        state = (jnp.int32(0), cache, first_B, out_BN, jnp.zeros((b,), bool))
        return jax.lax.while_loop(more, one, state)[3]

    return jax.jit(run)


def generate_ids(
    params: dict,
    model_cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> list[list[int]]:
    """New token ids for each prompt of ids, up to and including a stop id."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} is invalid: must be >= 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError(
            f"sampling temperature={temperature}, top_k={top_k}, top_p={top_p} is invalid: "
            "temperature >= 0 (0 = greedy), top_k >= 0 (0 = off), 0 < top_p <= 1"
        )
    if not prompts or not all(len(p) for p in prompts):
        raise ConfigError("every prompt must hold at least one token")
    cfg = inference_config(model_cfg)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(
            f"a prompt of {longest} tokens + --max-new-tokens={max_new_tokens} exceeds the "
            f"model's max_seq_len ({cfg.max_seq_len}); shorten one of them"
        )
    prompt_len = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.full((len(prompts), prompt_len), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, prompt_len - len(p) :] = p
    pad = np.asarray([prompt_len - len(p) for p in prompts], np.int32)
    if len(stop_ids) > MAX_STOP_IDS:
        raise ConfigError(f"at most {MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
    stops = np.full(MAX_STOP_IDS, -1, np.int32)  # -1: no token
    stops[: len(stop_ids)] = stop_ids
    greedy = temperature == 0
    top_k = 0 if greedy or top_k >= cfg.vocab_size else top_k
    run = _compiled(cfg, prompt_len, max_new_tokens, greedy, top_k,
                    not greedy and top_p < 1.0)  # fmt: skip
    out = np.asarray(
        run(params, tokens, pad, stops, jax.random.key(seed),
            jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p))
    )  # fmt: skip
    return [[int(t) for t in row if t >= 0] for row in out]


def prompt_ids(tokenizer: Tokenizer, text: str, *, chat: bool = False) -> list[int]:
    """`<bos>` text as training documents start, or with `chat` a user turn and the header of
    the assistant's reply (the chat template of `Tokenizer.encode_chat`)."""
    if not chat:
        return [tokenizer.bos_id, *tokenizer.encode(text)]
    ids, _ = tokenizer.encode_chat([{"role": "user", "content": text}])
    return [*ids[:-1], tokenizer.sep_id, *tokenizer.encode("assistant"), tokenizer.nl_id]


def stop_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """`<eos>` ends a document; `<sep>` starts the next chat turn (as the export's
    generation_config.json says)."""
    return tokenizer.eos_id, tokenizer.sep_id


def sample(
    params: dict,
    model_cfg: ModelConfig,
    tokenizer: Tokenizer | str | Path,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
) -> list[str]:
    """Each prompt's continuation as text (greedy when temperature is 0)."""
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    stops = stop_ids(tokenizer)
    outs = generate_ids(
        params, model_cfg, [prompt_ids(tokenizer, p, chat=chat) for p in prompts],
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, stop_ids=stops, pad_id=tokenizer.pad_id,
    )  # fmt: skip
    return [tokenizer.decode([t for t in ids if t not in stops]) for ids in outs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hanuman_jax.generate")
    parser.add_argument("--workdir", required=True, help="training run directory")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="prompt as a user turn of a chat")
    args = parser.parse_args(argv)
    from hanuman_jax.hf.export import load

    try:
        loaded = load(args.workdir, args.step)
        if loaded.tokenizer is None:
            raise ConfigError(f"checkpoint {loaded.directory} has no tokenizer")
        texts = sample(
            loaded.params, loaded.model_cfg, loaded.tokenizer, args.prompt,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed, chat=args.chat,
        )  # fmt: skip
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"--- {prompt}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
