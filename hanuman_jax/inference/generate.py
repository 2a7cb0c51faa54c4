"""Text generation with a KV cache under jax.jit: greedy (temperature 0), or sampling with
temperature, top-k and top-p.

python -m hanuman_jax.generate --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
    [--top-k K] [--top-p P] [--seed S] [--chat [--history TURNS.json]]

The model's own forward decodes (`Transformer.decode`, with a KV cache); this module drives it.
Prompts are left-padded to a common length: padding has segment id 0, so no real token attends to
it, and positions count from each prompt's first token.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hanuman_jax import cli
from hanuman_jax.config import ConfigError, ModelConfig
from hanuman_jax.data import DataError
from hanuman_jax.model import build
from hanuman_jax.model.transformer import init_cache
from hanuman_jax.planning.targets import local_target
from hanuman_jax.tokenizer import Tokenizer

PROMPT_BUCKET = 16  # prompt lengths are rounded up to this: fewer compilations
MAX_STOP_IDS = 8  # stop ids travel as a fixed-size array: changing them does not recompile


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
def compiled_generation(cfg: ModelConfig, prompt_len: int, max_new: int,
              greedy: bool, top_k: int, nucleus: bool):  # fmt: skip
    """The whole generation as one jitted function: prefill, then a while loop of single-token
    steps that ends when every sequence has stopped or max_new tokens are out."""
    pick = functools.partial(choose, greedy=greedy, top_k=top_k, nucleus=nucleus)

    def run(params, tokens_BT, pad_B, stops, rng, temperature, top_p):
        model = build.model_from_params(cfg, params)  # the cached path runs XLA's attention
        cache = init_cache(cfg, tokens_BT.shape[0], prompt_len + max_new)
        positions_BT = jnp.arange(prompt_len)[None, :] - pad_B[:, None]  # < 0: padding
        logits_BTV, cache = model.decode(
            tokens_BT, (positions_BT >= 0).astype(jnp.int32), jnp.maximum(positions_BT, 0), cache
        )
        first_B = pick(logits_BTV[:, -1], jax.random.fold_in(rng, 0), temperature, top_p)

        def more(state):
            step, _, _, _, done_B = state
            return (step < max_new) & ~jnp.all(done_B)

        def one(state):
            step, cache, token_B, out_BU, done_B = state
            out_BU = out_BU.at[:, step].set(jnp.where(done_B, -1, token_B))
            done_B = done_B | jnp.isin(token_B, stops)
            # a stopped row goes on as padding (segment 0): its tokens are never returned
            segment_ids_B1 = (~done_B)[:, None].astype(jnp.int32)
            positions_B1 = (prompt_len + step - pad_B)[:, None]
            logits_B1V, cache = model.decode(token_B[:, None], segment_ids_B1, positions_B1, cache)
            token_B = pick(logits_B1V[:, 0], jax.random.fold_in(rng, step + 1), temperature, top_p)
            return step + 1, cache, token_B, out_BU, done_B

        out_BU = jnp.full((tokens_BT.shape[0], max_new), -1, jnp.int32)
        state = (jnp.int32(0), cache, first_B, out_BU, jnp.zeros(first_B.shape, bool))
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
    target = local_target()
    cfg = build.inference_config(model_cfg, target)
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
    run = compiled_generation(cfg, prompt_len, max_new_tokens, greedy, top_k,
                    not greedy and top_p < 1.0)  # fmt: skip
    out = np.asarray(
        run(params, tokens, pad, stops, jax.random.key(seed),
            jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p))
    )  # fmt: skip
    return [[int(t) for t in row if t >= 0] for row in out]


def prompt_ids(
    tokenizer: Tokenizer, text: str, *, chat: bool = False, history: Sequence[dict] = ()
) -> list[int]:
    """`<bos>` text as training documents start, or with `chat` a user turn (after the earlier
    turns of `history`, their replies' `<think>` blocks dropped) and the header of the
    assistant's reply (the chat template of `Tokenizer.encode_chat`)."""
    if not chat:
        return [tokenizer.bos_id, *tokenizer.encode(text)]
    turns = [*history, {"role": "user", "content": text}]
    ids, _ = tokenizer.encode_chat(turns, drop_think=True)
    return [*ids[:-1], tokenizer.sep_id, *tokenizer.encode("assistant"), tokenizer.nl_id]


def read_history(path: str | Path) -> list[dict]:
    """Earlier chat turns from a JSON file: a list of {"role", "content"} (`--history`)."""
    try:
        turns = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"--history {path}: not a readable JSON file ({e})") from None
    roles = ("system", "user", "assistant")
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and t.get("role") in roles and isinstance(t.get("content"), str)
        for t in turns
    ):
        raise DataError(f"--history {path}: must hold a list of {{'role': one of {roles}, "
                        "'content': str}} turns")  # fmt: skip
    return turns


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
    history: Sequence[dict] = (),
) -> list[str]:
    """Each prompt's continuation as text (greedy when temperature is 0); with `chat`, each
    prompt is a user turn after the turns of `history`."""
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    stops = stop_ids(tokenizer)
    starts = [prompt_ids(tokenizer, p, chat=chat, history=history) for p in prompts]
    outs = generate_ids(
        params, model_cfg, starts, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, stop_ids=stops, pad_id=tokenizer.pad_id,
    )  # fmt: skip
    outs = [[t for t in ids if t not in stops] for ids in outs]
    if chat:  # a reply is a text of its own, as encode_chat encodes it
        return [tokenizer.decode(ids) for ids in outs]
    # a text's continuation keeps the space it starts with (decoded alone, it would be taken for
    # the one encode puts before a line's first word)
    return [tokenizer.decode_after(p, ids) for p, ids in zip(starts, outs, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser("hanuman_jax.generate", "Text from a training run's checkpoint.")
    parser.add_argument("--workdir", required=True, help="training run directory")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--chat", action="store_true", help="prompt as a user turn of a chat")
    parser.add_argument("--history", help="with --chat: a JSON file of earlier turns, a list of "
                        "{role, content}; their <think> blocks are dropped")  # fmt: skip
    args = parser.parse_args(argv)
    from hanuman_jax.checkpoint.restore import load_workdir

    try:
        if args.history and not args.chat:
            raise ConfigError("--history needs --chat (it holds earlier turns of a chat)")
        history = read_history(args.history) if args.history else ()
        loaded = load_workdir(args.workdir, args.step)
        if loaded.tokenizer is None:
            raise ConfigError(f"checkpoint {loaded.directory} has no tokenizer")
        texts = sample(
            loaded.params, loaded.model_cfg, loaded.tokenizer, args.prompt,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed, chat=args.chat, history=history,
        )  # fmt: skip
    except (ConfigError, DataError) as e:
        return cli.fail(e)
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"--- {prompt}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
