"""Generation: the KV-cached decode equals the full forward, sampling is seeded and truncated as
asked, stop ids stop, and the CLI runs on a checkpoint. (Equality with transformers' generate:
test_export.py.)"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, small_model_cfg

from hanuman_jax.config import ConfigError, MoeConfig, RopeConfig
from hanuman_jax.hf.importer import write_checkpoint
from hanuman_jax.inference.generate import choose, generate_ids, main, prompt_ids
from hanuman_jax.model.build import inference_config, model_from_params
from hanuman_jax.planning.targets import Target
from hanuman_jax.tokenizer import Tokenizer
from hanuman_jax.tokenizer.core import drop_thinking

TOKENIZER = Tokenizer("hanuman_jax/assets/sample/tokenizer.model")
# odd sizes, 5 experts; large weights so that greedy paths wander (a 0.02-init model repeats)
CFG = small_model_cfg(init_std=0.3, rope=RopeConfig(scaling="linear", factor=2.0))
PROMPTS = [[1, 17, 5, 88], [1, *range(30, 43)], [1, *range(50, 70)]]  # 4, 14, 21 tokens


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@jax.jit
def _forward(params, tokens_BT, segment_ids_BT):
    model = model_from_params(inference_config(CFG, Target("cpu")), params)
    return model(tokens_BT, segment_ids_BT)[0]


def _full_logits(params, sequences):
    """Logits of each sequence, by the model's own forward (no cache), in one padded batch."""
    tokens = np.zeros((2, len(sequences), max(map(len, sequences))), np.int32)
    for i, x in enumerate(sequences):
        tokens[:, i, : len(x)] = [x, np.ones(len(x))]  # ids, and segment 1 where not padding
    logits = _forward(params, *tokens)
    return [np.asarray(logits[i, : len(x)]) for i, x in enumerate(sequences)]


def test_cached_greedy_decode_equals_the_full_forward(params):
    out = generate_ids(params, CFG, PROMPTS, max_new_tokens=12)
    assert [len(x) for x in out] == [12, 12, 12] and len(set(out[0])) > 3
    full = _full_logits(params, [p + o for p, o in zip(PROMPTS, out, strict=True)])
    for prompt, new, logits in zip(PROMPTS, out, full, strict=True):
        assert list(np.argmax(logits[len(prompt) - 1 : -1], -1)) == new

    # a stop id ends a row after that token; the others go on
    stop = out[1][2]
    stopped = generate_ids(params, CFG, PROMPTS, max_new_tokens=12, stop_ids=[stop])
    for row, full_row in zip(stopped, out, strict=True):
        end = full_row.index(stop) + 1 if stop in full_row else len(full_row)
        assert row == full_row[:end]
    assert len(stopped[1]) == 3


def test_sampling_is_seeded_and_stays_in_the_top_k(params):
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=4, top_p=0.95)
    a = generate_ids(params, CFG, PROMPTS, seed=1, **kw)
    assert a == generate_ids(params, CFG, PROMPTS, seed=1, **kw)
    assert a != generate_ids(params, CFG, PROMPTS, seed=2, **kw)
    full = _full_logits(params, [p + o for p, o in zip(PROMPTS, a, strict=True)])
    for prompt, new, logits in zip(PROMPTS, a, full, strict=True):
        top4 = np.argsort(logits[len(prompt) - 1 : -1], -1)[:, -4:]
        assert all(t in row for t, row in zip(new, top4, strict=True))


def test_choose_truncates_as_asked():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15], [0.4, 0.1, 0.2, 0.3]]))
    rng, one = jax.random.key(0), jnp.float32(1.0)
    pick = jax.jit(choose, static_argnames=("greedy", "top_k", "nucleus"))
    greedy = pick(logits, rng, one, one, greedy=True, top_k=0, nucleus=False)
    assert greedy.tolist() == [1, 0]
    nucleus = jax.jit(jax.vmap(lambda r: choose(logits, r, one, jnp.float32(0.75), greedy=False,
                                                top_k=0, nucleus=True)))  # fmt: skip
    draws = nucleus(jax.random.split(rng, 400))
    assert set(np.asarray(draws[:, 0]).tolist()) == {1, 2}  # 0.5 + 0.3 reaches 0.75
    assert set(np.asarray(draws[:, 1]).tolist()) == {0, 2, 3}  # 0.4 + 0.3 does not
    top1 = pick(logits, rng, jnp.float32(5.0), one, greedy=False, top_k=1, nucleus=False)
    assert top1.tolist() == [1, 0]


def test_bad_requests_are_refused(params):
    with pytest.raises(ConfigError, match="exceeds the model's max_seq_len"):
        generate_ids(params, CFG, PROMPTS, max_new_tokens=50)
    with pytest.raises(ConfigError, match="top_p"):
        generate_ids(params, CFG, PROMPTS, max_new_tokens=4, temperature=1.0, top_p=0.0)
    with pytest.raises(ConfigError, match="at least one token"):
        generate_ids(params, CFG, [[]], max_new_tokens=4)


def test_a_continuation_keeps_the_space_it_starts_with(params, monkeypatch):
    """A text prompt's continuation keeps the space it starts with (`Tokenizer.decode_after`);
    after `<bos>`, and in a chat's reply, it is the one encode puts there."""
    import hanuman_jax.inference.generate as generate

    world = TOKENIZER.encode("world")  # "▁world": the bundled tokenizer's dummy-prefix space
    assert TOKENIZER.sp.id_to_piece(world[0]).startswith("▁")
    monkeypatch.setattr(generate, "generate_ids", lambda p, c, prompts, **k: [world] * len(prompts))
    texts = generate.sample(params, CFG, TOKENIZER, ["Hello", "", "x\n"], max_new_tokens=2)
    assert texts == [" world", "world", " world"]  # this tokenizer's space is the text's start
    assert generate.sample(params, CFG, TOKENIZER, ["hi"], max_new_tokens=2, chat=True) == ["world"]


def test_chat_prompt_is_the_training_template():
    ids = prompt_ids(TOKENIZER, "สวัสดี <sep>", chat=True)
    turn = [{"role": "user", "content": "สวัสดี <sep>"}, {"role": "assistant", "content": ""}]
    assert ids == TOKENIZER.encode_chat(turn)[0][:-1]  # the reply's header, then the model
    assert prompt_ids(TOKENIZER, "hello") == [TOKENIZER.bos_id, *TOKENIZER.encode("hello")]


def test_chat_history_drops_the_think_blocks_of_earlier_replies():
    """Training keeps `<think>` blocks verbatim; at inference a reply in the history keeps only
    its answer (every block, and the space after it), and the reply being trained on keeps all."""
    thought = "<think>2 + 2 = 4</think>\nมันคือ 4 <think>ตรวจ: ถูก</think> ครับ"
    history = [{"role": "system", "content": "ตอบสั้น ๆ"}, {"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": thought}]  # fmt: skip
    ids = prompt_ids(TOKENIZER, "แล้ว 3+3?", chat=True, history=history)
    later = [{"role": "user", "content": "แล้ว 3+3?"}, {"role": "assistant", "content": ""}]
    plain = [*history[:2], {"role": "assistant", "content": "มันคือ 4 ครับ"}, *later]
    assert ids == TOKENIZER.encode_chat(plain)[0][:-1]
    kept = TOKENIZER.encode_chat([*history, later[0]])[0]
    assert ids[: len(kept) - 1] != kept[:-1]  # training's layout keeps the blocks
    assert TOKENIZER.encode_chat(history, drop_think=True) == TOKENIZER.encode_chat(history)
    assert drop_thinking("<think>unclosed") == "<think>unclosed"


def test_cli_generates_from_a_checkpoint(tmp_path, capsys):
    cfg = small_model_cfg(vocab_size=TOKENIZER.vocab_size, moe=MoeConfig())
    write_checkpoint(random_params(cfg), cfg, tmp_path / "run", tokenizer=TOKENIZER.path)
    argv = ["--workdir", str(tmp_path / "run"), "--max-new-tokens", "6"]
    assert main([*argv, "--prompt", "Hello", "--prompt", "ภาษาไทย", "--temperature", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "--- Hello\n" in out and "--- ภาษาไทย\n" in out
    assert main([*argv, "--prompt", "x", "--step", "5"]) == 2
    assert "no checkpoint for step 5; saved steps: 0" in capsys.readouterr().err
    turns = tmp_path / "turns.json"
    said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>"}]
    turns.write_text(json.dumps(said))
    assert main([*argv, "--prompt", "again", "--chat", "--history", str(turns)]) == 0
    assert "--- again\n" in capsys.readouterr().out
    assert main([*argv, "--prompt", "again", "--history", str(turns)]) == 2
    assert "--history needs --chat" in capsys.readouterr().err
    turns.write_text('[{"role": "robot", "content": "x"}]')
    assert main([*argv, "--prompt", "again", "--chat", "--history", str(turns)]) == 2
    assert "turns.json: must hold a list of" in capsys.readouterr().err
