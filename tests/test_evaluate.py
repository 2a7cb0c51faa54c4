"""Evaluation: the loss is the mean next-token loss of each document as training sees it, long
documents are windowed so that every token is predicted once, and the CLI's last line is JSON.
(Equality with transformers' loss: test_export.py.)"""

import json
import math

import jax
import numpy as np
import pytest
from conftest import random_params, small_model_cfg

from hanuman_jax.config import ConfigError
from hanuman_jax.data import Document
from hanuman_jax.hf.importer import write_checkpoint
from hanuman_jax.inference.evaluate import evaluate, main, windows
from hanuman_jax.model.build import inference_config, model_from_params
from hanuman_jax.planning.targets import Target
from hanuman_jax.tokenizer import Tokenizer

TOKENIZER = Tokenizer("hanuman_jax/assets/sample/tokenizer.model")
CFG = small_model_cfg(vocab_size=TOKENIZER.vocab_size, init_std=0.1)  # 5 experts, max_seq_len 64
TEXTS = ["Hello there, this is a test.", "ภาษาไทยเป็นภาษาที่มีวรรณยุกต์", "x"]
CHAT = Document(messages=({"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "สวัสดีครับ"}))  # fmt: skip


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@jax.jit
def _forward(params, tokens_BT, segment_ids_BT):
    model = model_from_params(inference_config(CFG, Target("cpu")), params)
    return model(tokens_BT, segment_ids_BT)[0]


def _nll(params, ids, mask):
    """Summed next-token loss of one whole sequence (the model's plain forward) and targets."""
    tokens = np.zeros((2, 1, CFG.max_seq_len), np.int32)  # one shape: one compilation
    tokens[:, 0, : len(ids)] = [ids, np.ones(len(ids))]
    logits = np.asarray(_forward(params, *tokens)[0, : len(ids)], np.float64)[:-1]
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - logits[np.arange(len(ids) - 1), ids[1:]]
    return float(np.sum(nll * np.asarray(mask[1:]))), int(np.sum(mask[1:]))


def test_loss_is_the_mean_over_every_predicted_token(params):
    docs = [Document(text=t) for t in TEXTS] + [CHAT]
    result = evaluate(params, CFG, TOKENIZER, docs, batch_size=3)  # two batches, one partial
    sequences = [(TOKENIZER.encode_document(t), None) for t in TEXTS]
    sequences.append(TOKENIZER.encode_chat(CHAT.messages))
    nll = tokens = 0
    for ids, mask in sequences:
        n, t = _nll(params, ids, mask or [1] * len(ids))
        nll, tokens = nll + n, tokens + t
    chat_bytes = len("สวัสดีครับ".encode())  # a chat scores only the assistant's reply
    assert result["tokens"] == tokens
    assert result["bytes"] == sum(len(t.encode()) for t in TEXTS) + chat_bytes
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / result["bytes"], rel=1e-5)


def test_windows_predict_every_token_once():
    ids = list(range(100, 137))
    for length in (2, 5, 36, 37, 64):
        targets = [t for w, _ in windows(ids, ids, length) for t in w[1:]]
        assert targets == ids[1:]
        assert all(len(w) <= length for w, _ in windows(ids, ids, length))


def test_cli_prints_a_table_and_json_last(params, tmp_path, capsys):
    write_checkpoint(params, CFG, tmp_path / "run", tokenizer=TOKENIZER.path)
    long_text = " ".join(f"word{i}" for i in range(60))  # longer than the 16-token window
    (tmp_path / "a.txt").write_text(f"{TEXTS[0]}\n{long_text}\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": list(CHAT.messages)}) + "\n")
    argv = ["--workdir", str(tmp_path / "run"), "--seq-len", "16", "--input"]
    assert main([*argv, str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["input", "tokens", "bytes"] and lines[-2].startswith("all")
    result = json.loads(lines[-1])
    assert set(result) == {"step", "loss", "perplexity", "bits_per_byte", "tokens", "bytes"}
    texts = [TEXTS[0], long_text]
    chat_targets = sum(TOKENIZER.encode_chat(CHAT.messages)[1][1:])
    assert result["tokens"] == sum(len(TOKENIZER.encode(t)) + 1 for t in texts) + chat_targets
    assert result["bytes"] == sum(len(t.encode()) for t in texts) + len("สวัสดีครับ".encode())
    assert main([*argv, str(tmp_path / "missing.txt")]) == 2
    assert "matches no file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--seq-len=65 is invalid"):
        evaluate(params, CFG, TOKENIZER, TEXTS, seq_len=65)


HELD_OUT = [  # each longer than half a 64-token row, so whole packing gives it a row alone
    "Mangoes are cheapest in April, when the trees are heavy with fruit. Keep unripe ones out "
    "of the fridge.",
    "ร้านกาแฟเล็ก ๆ หน้าปากซอยเปิดมาได้สามปีแล้ว ลูกค้าส่วนใหญ่เป็นพนักงานออฟฟิศที่แวะซื้อก่อนขึ้น"
    "รถไฟฟ้า ช่วงหน้าฝนขายโกโก้ร้อนได้ดี",
    "พรุ่งนี้มี meeting กับ client ตอนสิบโมง ใครทำ slide เสร็จแล้วส่งเข้า shared folder ก่อนห้าโมง"
    "เย็นนี้นะครับ ขอบคุณมากครับทุกคน 😅",
    "The night train to Nong Khai left on time. The beds were clean, and the staff were kind to "
    "us all.",
]
HELD_OUT_CHATS = [
    [{"role": "user", "content": "ดื่มน้ำเย็นได้ไหม"},
     {"role": "assistant", "content": "ได้ค่ะ แต่ถ้าเพิ่งออกกำลังกายหนัก ๆ ควรค่อย ๆ จิบ\nไม่ควรดื่ม"
                                      "รวดเดียวมาก ๆ ค่ะ"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "3 + 4?"},
     {"role": "assistant", "content": "<think>3 + 4 = 7</think>7"},
     {"role": "user", "content": "x 2?"}, {"role": "assistant", "content": "14"}],
    [{"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Air scatters blue light much more than red light, so blue "
                                      "reaches your eyes from every part of the sky."}],
    [{"role": "user", "content": "แปลเป็นอังกฤษ: ร้านนี้ปิดวันจันทร์"},
     {"role": "assistant", "content": " This shop is closed on Mondays."}],
]  # fmt: skip


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_evaluation_in_training_agrees_with_evaluate(tmp_path, kind):
    """The training loop's Evaluator (packed rows, bytes from `Tokenizer.text_bytes`) and
    `evaluate` (each document from its start, bytes of its text) score four held-out documents
    alike: the same targets, bytes, loss and bits per byte. Whole packing with four lanes puts
    each document in a row of its own, once."""
    from hanuman_jax import sharding
    from hanuman_jax.config import load_config
    from hanuman_jax.training.loop import Evaluator, eval_batches
    from hanuman_jax.training.step import build_setup

    if kind == "text":
        docs = [Document(text=t) for t in HELD_OUT]
        lines, ids = HELD_OUT, [TOKENIZER.encode_document(t) for t in HELD_OUT]
    else:
        docs = [Document(messages=tuple(c)) for c in HELD_OUT_CHATS]
        lines = [json.dumps({"messages": c}, ensure_ascii=False) for c in HELD_OUT_CHATS]
        ids = [TOKENIZER.encode_chat(c)[0] for c in HELD_OUT_CHATS]
    assert all(32 < len(i) <= 64 for i in ids), [len(i) for i in ids]
    path = tmp_path / ("held.txt" if kind == "text" else "held.jsonl")
    path.write_text("\n".join(lines) + "\n")
    small = ("num_layers=1", "d_model=48", "init_std=0.1", "vocab_size=4096")
    cfg = load_config("configs/tiny.py", [
        *(f"--config.model.{o}" for o in small), "--config.data.seq_len=64",
        "--config.data.packing=whole", "--config.train.batch_size=4",
        f"--config.data.eval_sources=[{{'path': '{path}'}}]"])  # fmt: skip
    setup = build_setup(cfg, sharding.make_mesh(cfg.mesh))
    params = random_params(setup.model_cfg)
    ours = Evaluator(setup, *eval_batches(cfg, TOKENIZER.path))(params)
    theirs = evaluate(params, setup.model_cfg, TOKENIZER, docs, seq_len=64)
    assert (ours["tokens"], ours["bytes"]) == (theirs["tokens"], theirs["bytes"])
    for key in ("loss", "bits_per_byte"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key
