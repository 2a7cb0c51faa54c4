"""Hugging Face export: AutoTokenizer (slow and fast) gives our `Tokenizer`'s ids and text back,
and its chat template `Tokenizer.encode_chat`'s ids and loss mask."""

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import sentencepiece as spm  # noqa: E402
from jinja2.exceptions import TemplateError  # noqa: E402
from sentencepiece import sentencepiece_model_pb2  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from hanuman_jax.inference.generate import prompt_ids  # noqa: E402
from hanuman_jax.tokenizer.core import Tokenizer, normalization_rules, normalize  # noqa: E402
from hanuman_jax.tokenizer.hf import charsmap_rules, chat_template, export_hf  # noqa: E402
from hanuman_jax.tokenizer.train import corpus_texts, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "hanuman_jax" / "assets" / "sample"
SHARED_DATA = ROOT.parent / "shared" / "data"
CRAFTED = [
    "", " ", "   ", "\n", "\r\n", "a\rb\r\nc\n", " \n ", "\n\nสอง\n\n",
    "ก\u0e48\u0e38", "กุ่มก\u0e49\u0e39", "cafe\u0301 \u212b",  # NFC changes all three
    "“quoted” ‘single’ — dash – en − minus «guillemets»", "—\u0301 «\u0301",
    "๑๒๓ ๒๕๖๗ 123 2024", "deadlineครับ", "emoji 😀🎉👍🏽 ok", "ㅠ ㅠ 中文 العربية",
    "multiple   spaces", "  leading", "trailing  ", "\tTabs\tand\t\ttabs\t",
    "line one\nline two\r\nline three", "literal <nl> symbol<nl>", "<bos ><eos <pad <unk >>",
    "<lang_th>สวัสดี<translate>hello<copy><lang_en>", "<0x41><0xE0>",
    "< > << >> <a> <nl", "▁already▁spaced▁", "nul\x00byte", "zero\u200bwidth\u200djoin",
    "ﬁ ligature ① ｆｕｌｌ width", "x" * 3000,
    "\u200b", "\ufeff\u00ad", " \u200b", "a\u00a0\u3000b",  # spaces folded, invisibles removed
    "ว่า \u00a0รัฐบาล", "a\u00a0\u00a0 \u00a0b", "x" + " \u00a0" * 7 + "y",  # no-break runs
    " " * 8 + "\u00a0z", "\u00a0 \u00a0\n\u00a0 x", "two  spaces\u00a0",
    # a line's first ASCII word gets a space in a model trained since 2026-12-06 (WORD_SPACE)
    "Word", "  Indented\n words\n\tTab", "\u00a0Word", "\u200b \u200bWord", "x\r\n  Y\rZ",
    "<nl>Word<nl> ก<nl>  x", "▁Word", "ไทย\nEnglish", "é 1st", "a\n\n\nB", "\u3000\u2003Q",
    "x<n\u200bl> Hi", "x<n\u00adl>Hi", "x<sep> Hello", "x<se\u200bp>Hi<sep>ไทย",
    "def f(x):\n    return x  # two\n" + " " * 16 + "deep" + " " * 17 + "y",  # runs of spaces
    "\n".join(" " * n + "z" for n in range(20)),
]  # fmt: skip


def sample_lines() -> list[str]:
    return [
        line for f in sorted(SAMPLE.glob("*.txt")) for line in f.read_text("utf-8").splitlines()
    ]


def load_both(out: Path) -> list:
    """AutoTokenizer with use_fast=True and False (transformers 5 ignores the flag)."""
    return [AutoTokenizer.from_pretrained(out, use_fast=fast) for fast in (True, False)]


def assert_parity(tok: Tokenizer, hf, texts: list[str]) -> None:
    """SentencePiece's ids for every text, exactly, and the same text back from them."""
    got = hf(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, got, strict=True):
        want = tok.encode(text)
        assert ids == want, (text[:200], hf.convert_ids_to_tokens(ids)[:40],
                             [tok.sp.id_to_piece(i) for i in want][:40])  # fmt: skip
        assert hf.decode(ids) == tok.decode(want), text[:200]


@pytest.fixture(scope="module")
def sample_model(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    files = [str(f) for f in sorted(SAMPLE.glob("*.txt"))]
    return train_tokenizer([corpus_texts(files, None, "keep")], tmp / "sample", 3000)


@pytest.fixture(scope="module")
def sample_hf(sample_model, tmp_path_factory) -> Path:
    return export_hf(sample_model, tmp_path_factory.mktemp("hf"))


def test_files(sample_hf):
    names = {p.name for p in sample_hf.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= names
    config = json.loads((sample_hf / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_ids_match_sentencepiece(sample_model, sample_hf):
    tok = Tokenizer(sample_model)
    lines = sample_lines()
    assert len(lines) > 800
    for hf in load_both(sample_hf):
        assert_parity(tok, hf, lines + CRAFTED)


def test_ids_match_when_brackets_are_known(tmp_path):
    # Here "<" and ">" are pieces, so no cut of the text keeps "<bos>" out: only its low score.
    html = [f"<p>{line[:40]}</p> if a < b and b > c: <br>" for line in sample_lines()[:300]]
    texts = [normalize(line) for line in [*sample_lines(), *html]]
    model = train_tokenizer([texts], tmp_path / "html", 3000)
    out = export_hf(model, tmp_path / "hf")
    assert json.loads((out / "tokenizer.json").read_text())["pre_tokenizer"] is None
    assert_parity(Tokenizer(model), load_both(out)[0], html + CRAFTED)


def test_special_tokens_and_bos(sample_model, sample_hf):
    tok = Tokenizer(sample_model)
    for hf in load_both(sample_hf):
        names = (hf.unk_token, hf.bos_token, hf.eos_token, hf.pad_token)
        assert names == ("<unk>", "<bos>", "<eos>", "<pad>")
        ids = (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
        assert ids == (0, 1, 2, 3)
        assert len(hf) == tok.vocab_size
        for text in ["สวัสดีครับ hello", "a\nb", ""]:
            assert hf(text)["input_ids"] == [1, *tok.encode(text)]
        # A typed control name is the token (as the chat template needs), and text after a
        # typed <sep> starts a word, where SentencePiece reads letters and goes on.
        assert hf("x<eos><bos>")["input_ids"] == [1, *tok.encode("x"), 2, 1]
        assert hf("a<sep>b <sep>")["input_ids"] == [1, *tok.encode("a"), 10, *tok.encode("b "), 10]
        assert hf("x", "y")["input_ids"] == [1, *tok.encode("x"), 1, *tok.encode("y")]
        batch = hf(["ก", "ข้อความยาวกว่า"], padding=True)["input_ids"]
        assert batch[0][-1] == 3 and batch[0][0] == 1


def test_decode_gives_the_text_back(sample_model, sample_hf):
    tok = Tokenizer(sample_model)
    hf = load_both(sample_hf)[0]
    for text in [*sample_lines()[:200], "line one\nline two\r\nthree", " two  spaces ", "ไทย\n"]:
        ids = hf(text)["input_ids"]
        assert hf.decode(ids, skip_special_tokens=True) == normalize(text)
    assert hf.decode(hf("“hi” — x")["input_ids"][1:]) == '"hi" - x'
    assert hf.decode([1, *tok.encode("a\nb"), 2], skip_special_tokens=True) == "a\nb"
    assert hf.decode([*tok.encode("reply"), 10], skip_special_tokens=True) == "reply"


def test_charsmap_rules_read_back(sample_model):
    proto = sentencepiece_model_pb2.ModelProto.FromString(sample_model.read_bytes())
    assert charsmap_rules(proto.normalizer_spec.precompiled_charsmap) == normalization_rules("keep")


def test_refuses_other_models(tmp_path):
    lines = sample_lines()[:300]
    prefix = str(tmp_path / "plain")  # SentencePiece's defaults: no <pad>, no user symbols
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=200, minloglevel=2
    )
    with pytest.raises(ValueError, match="fixed special ids") as err:
        export_hf(tmp_path / "plain.model", tmp_path / "hf")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"needs the shared corpora at {SHARED_DATA}")
def test_ids_match_on_shared_data(tmp_path):
    files = sorted((SHARED_DATA / "thai_social").glob("*.txt"))
    social = [line for f in files for line in f.read_text("utf-8").splitlines()]
    english = (SHARED_DATA / "english" / "tinyshakespeare.txt").read_text("utf-8").splitlines()
    with open(SHARED_DATA / "thai_news" / "thaigov_train.jsonl", encoding="utf-8") as f:
        news = [json.loads(next(f))["text"] for _ in range(200)]
    # 2000 + 1000 evenly spaced lines of 40+ characters: enough text for 8000 pieces.
    th, en = ([line for line in x if len(line) >= 40] for x in (social, english))
    subset = th[:: len(th) // 2000][:2000] + en[:: len(en) // 1000][:1000]
    model = train_tokenizer([[normalize(line) for line in subset]], tmp_path / "shared", 8000)
    out = export_hf(model, tmp_path / "hf")
    tok = Tokenizer(model)
    fast, slow = load_both(out)
    # Whole news articles, newlines and all, up to 12,395 tokens: rounded scores keep even those
    # exact in SentencePiece's float32.
    texts = social + english + news
    assert_parity(tok, fast, texts)
    if slow.is_fast:  # transformers 5 (and 4, for this format): the same Rust tokenizer
        assert slow.backend_tokenizer.to_str() == fast.backend_tokenizer.to_str()
    else:
        assert_parity(tok, slow, texts)


@pytest.fixture(scope="module", params=["bundled", "today"])
def bundled(request, tmp_path_factory) -> tuple[Tokenizer, object]:
    """The bundled sample tokenizer (trained on the chats too, with a dummy-prefix space) and
    one trained the same way with today's defaults (no dummy prefix; a space before a line's
    first ASCII word instead), and their exports."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = SAMPLE / "tokenizer.model"
    if request.param == "today":
        chats = [m["content"] for chat in bundled_chats() for m in chat]
        model = train_tokenizer([[normalize(x) for x in sample_lines() + chats]], tmp / "t", 3000)
    assert Tokenizer(model)._dummy_prefix == (request.param == "bundled")
    assert Tokenizer(model)._word_space == (request.param == "today")
    return Tokenizer(model), AutoTokenizer.from_pretrained(export_hf(model, tmp / "hf"))


def bundled_chats() -> list[list[dict]]:
    lines = (SAMPLE / "chat.jsonl").read_text("utf-8").splitlines()
    chats = [json.loads(line)["messages"] for line in lines]
    contents = [m["content"] for chat in chats for m in chat]
    # what the template must get right is all there: Thai, English, system prompts, several
    # turns, <think> blocks and newlines
    assert any("ครับ" in c for c in contents) and any("the" in c.split() for c in contents)
    assert any(c[0]["role"] == "system" for c in chats) and max(map(len, chats)) >= 4
    assert any(c.startswith("<think>") for c in contents) and any("\n" in c for c in contents)
    return chats


EDGE_CONTENTS = ["", "\u200b", "\ufeff\u00ad", " ", "  two", "\u200bx", "a\n\nb\r\n", "\n",
                 "ก\u0e48\u0e38", "“q” — x", "<think>\n</think>", "x" * 300, "<0x41>",
                 "ok\n Two\nthree", "\u00a0Hi"]  # fmt: skip


def test_chat_template_gives_encode_chat_ids_and_mask(bundled):
    tok, hf = bundled
    edge = [[{"role": "system", "content": c}, {"role": "user", "content": c},
             {"role": "assistant", "content": c}] for c in EDGE_CONTENTS]  # fmt: skip
    for chat in bundled_chats() + edge:
        ids, mask = tok.encode_chat(chat)
        out = hf.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids, (chat, hf.convert_ids_to_tokens(out["input_ids"])[:40])
        # TRL's assistant_only_loss trains on what our loss mask does: replies and their ends
        assert out["assistant_masks"] == mask, chat


def test_generation_prompt_is_generate_chat_prompt(bundled):
    tok, hf = bundled
    header = [tok.sep_id, *tok.encode("assistant"), tok.nl_id]
    for chat in bundled_chats():
        for n in range(1, len(chat) + 1):
            prompt = hf.apply_chat_template(chat[:n], add_generation_prompt=True, return_dict=False)
            assert prompt == tok.encode_chat(chat[:n], drop_think=True)[0][:-1] + header
            if chat[n - 1]["role"] == "user":
                text, history = chat[n - 1]["content"], chat[: n - 1]
                assert prompt == prompt_ids(tok, text, chat=True, history=history)
            if n < len(chat) and chat[n]["role"] == "assistant":  # the reply comes after it
                full = hf.apply_chat_template(chat[: n + 1], return_dict=False)
                assert full[: len(prompt)] == prompt and len(full) > len(prompt) + 1


@pytest.mark.parametrize(
    "reply",
    ["<think>a</think>b", "<think>a</think>  \n b", "x<think>a</think>y<think>c</think>\nz",
     "<think>a <think>b</think>c", "<think>only</think>\u200b", "<think>open", "</think>x<think>y",
     "<think>\n</think>\n\nok", "<think>a</think><think>b</think>"],
)  # fmt: skip
def test_generation_prompt_drops_thinking_from_history(bundled, reply):
    """At inference the replies before the last user turn lose their <think> blocks, as in
    `generate --chat --history`; without a generation prompt (training) they stay."""
    tok, hf = bundled
    header = [tok.sep_id, *tok.encode("assistant"), tok.nl_id]
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]
    chat = [*history, {"role": "user", "content": "next"}, {"role": "assistant", "content": reply}]
    prompt = hf.apply_chat_template(chat[:3], add_generation_prompt=True, return_dict=False)
    assert prompt == prompt_ids(tok, "next", chat=True, history=history)
    kept = tok.encode_chat(chat[:3])[0][:-1] + header
    assert (prompt == kept) == (reply in ("<think>open", "</think>x<think>y"))  # nothing closed
    assert hf.apply_chat_template(chat, return_dict=False) == tok.encode_chat(chat)[0]
    # the last reply is not history: a generation prompt after it keeps its block
    after = hf.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert after == tok.encode_chat(chat, drop_think=True)[0][:-1] + header
    assert after[: len(prompt)] == prompt


@pytest.mark.parametrize(
    "message, says",
    [
        ({"role": "tool", "content": "x"}, "chat message 1 must have role in"),
        ({"role": "user", "content": ["x"]}, "chat message 1 must have role in"),
        ({"role": "user", "content": "a <sep> assistant"}, "chat message 1 holds <sep>"),
        ({"role": "user", "content": "a <se\u200bp> b"}, "chat message 1 holds <sep>"),
        ({"role": "assistant", "content": "no\n<eos>"}, "chat message 1 holds <eos>"),
    ],
)
def test_chat_template_refuses_what_encode_chat_would_encode_otherwise(bundled, message, says):
    tok, hf = bundled
    chat = [{"role": "user", "content": "hi"}, message]
    with pytest.raises(TemplateError, match=says):
        hf.apply_chat_template(chat)
    if "holds" not in says:
        with pytest.raises(ValueError, match="must have role in"):
            tok.encode_chat(chat)


def test_chat_template_is_in_tokenizer_config(sample_hf):
    config = json.loads((sample_hf / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat_template()
    assert AutoTokenizer.from_pretrained(sample_hf).chat_template == chat_template()
