"""Chat datasets of every row shape, read through the `hf:` path (`datasets.load_dataset` on a
local folder or file, as it reads a hub dataset): the shape each source is found to have and the
log line naming it, the chats produced, and the rows that do not fit, skipped and counted."""

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from hanuman_jax.config import load_config
from hanuman_jax.data import DataError, make_dataset, resolve_file
from hanuman_jax.data.sources import SKIP_REASONS, Skip, open_source

datasets = pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[1]

HELLO = (("user", "สวัสดีครับ"), ("assistant", "สวัสดีครับ มีอะไรให้ช่วยไหม"))
THINK = (("system", "Answer briefly."), ("user", "2+2?"), ("assistant", "<think>2+2=4</think>\n4"))
TWICE = (("user", "Name a fruit."), ("assistant", "Mango."), ("user", "Another?"),
         ("assistant", "Durian.\nIt smells strong."))  # fmt: skip
CHATS = (HELLO, THINK, TWICE)
PAIRS = (HELLO, THINK)  # a pair holds one question, and a system prompt in its own field


def _turns(chat, role="role", text="content", names=None):
    return [{role: (names or {}).get(r, r), text: t} for r, t in chat]


def _pair(chat, prompt, answer):
    row = {prompt: chat[-2][1], answer: chat[-1][1]}
    return row | ({"system": chat[0][1]} if chat[0][0] == "system" else {})


def _tagged(chat, tags, sep="\n", head=""):
    """A transcript: each turn behind its role's tag, the system turn behind `tags["system"]`."""
    return head + sep.join(f"{tags[r]}{t}" for r, t in chat)


SPEAKER = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
HUMAN_AI = {"system": "System: ", "user": "Human: ", "assistant": "AI: "}
THAI = {"system": "ระบบ: ", "user": "ผู้ใช้: ", "assistant": "ผู้ช่วย: "}
HEADINGS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
CHATML = {r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")}


def _chatml(chat):
    return "\n".join(f"{CHATML[r]}{t}<|im_end|>" for r, t in chat)


def _llama(chat):
    text, turns = "", list(chat)
    system = turns.pop(0)[1] if turns[0][0] == "system" else None
    for (_, question), (_, answer) in zip(turns[::2], turns[1::2], strict=True):
        sys = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system and not text else ""
        text += f"<s>[INST] {sys}{question} [/INST] {answer} </s>"
    return text


SHAPES = [  # id, good rows from CHATS (or PAIRS), what the log names, bad rows, their skips
    ("messages", [{"messages": _turns(c)} for c in CHATS], "'messages', a list of role/content",
     [{"messages": [{"role": "tool", "content": "x"}]}, {"messages": _turns(HELLO[:1])}],
     {"missing_field": 1, "empty": 1}),
    ("sharegpt", [{"conversations": _turns(c, "from", "value", {"user": "human", "assistant":
                                                                 "gpt"})} for c in CHATS],
     "'conversations', a list of from/value", [{"conversations": None}], {"missing_field": 1}),
    ("alpaca", [{"instruction": "Answer briefly.", "input": c[-2][1], "output": c[-1][1]}
                for c in PAIRS], "'instruction' (+ input) -> 'output'",
     [{"instruction": "", "input": "", "output": "x"}, {"instruction": "q", "input": "",
                                                        "output": None}],
     {"empty": 1, "missing_field": 1}),
    ("question_answer", [_pair(c, "question", "answer") for c in PAIRS],
     "'question' -> 'answer'", [{"question": "q", "answer": None}], {"missing_field": 1}),
    ("Question_Answer", [_pair(c, "Question", "Answer") for c in PAIRS],
     "'Question' -> 'Answer'", [{"Question": "q", "Answer": " "}], {"empty": 1}),
    ("prompt_completion", [_pair(c, "prompt", "completion") for c in PAIRS],
     "'prompt' -> 'completion'", [], {}),
    ("query_response", [_pair(c, "query", "response") for c in PAIRS], "'query' -> 'response'",
     [], {}),
    ("input_output", [_pair(c, "input", "output") for c in PAIRS], "'input' -> 'output'", [], {}),
    ("user_assistant", [_pair(c, "user", "assistant") for c in PAIRS], "'user' -> 'assistant'",
     [], {}),
    ("thai_pair", [_pair(c, "คำถาม", "คำตอบ") for c in PAIRS], "'คำถาม' -> 'คำตอบ'", [], {}),
    ("user_tags", [{"text": _tagged(c, SPEAKER)} for c in CHATS], "'text' with speaker tags",
     [{"text": "no tags at all"}, {"text": "User: a question, no reply"}],
     {"missing_field": 2}),
    ("human_ai_tags", [{"conversation": _tagged(c, HUMAN_AI, "\n\n")} for c in CHATS],
     "'conversation' with speaker tags", [], {}),
    ("thai_tags", [{"text": _tagged(c, THAI)} for c in CHATS], "'Name:' at line starts", [], {}),
    ("inline_tags", [{"transcript": _tagged(c, SPEAKER, " ")} for c in CHATS],
     "'Name:' within lines", [], {}),
    ("headings", [{"text": _tagged(c, HEADINGS, "\n\n")} for c in CHATS], "### Instruction:",
     [{"text": "### Instruction:\nonly a question"}], {"missing_field": 1}),
    ("chatml", [{"text": _chatml(c)} for c in CHATS], "<|im_start|>user", [], {}),
    ("llama", [{"text": _llama(c)} for c in CHATS], "[INST] ... [/INST]", [], {}),
]  # fmt: skip


def _write(folder: Path, rows: list[dict], name: str = "Oss-10K.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _read(path: str):
    source = open_source({"path": path}, "data.sources[0]")
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize(("shape", "good", "named", "bad", "skips"), SHAPES,
                         ids=[s[0] for s in SHAPES])  # fmt: skip
def test_every_shape_reads_through_hf(tmp_path, caplog, shape, good, named, bad, skips):
    caplog.set_level(logging.INFO, logger="hanuman_jax")
    folder = _write(tmp_path / shape, good + bad)
    path = f"hf:{folder}" if shape != "alpaca" else f"hf:{folder / 'Oss-10K.jsonl'}:train"
    records = _read(path)
    assert f"data.sources[0]: {path} holds " in caplog.text and named in caplog.text
    chats = [tuple((m["role"], m["content"]) for m in r.messages) for r in records[: len(good)]]
    expected = PAIRS if len(good) == len(PAIRS) else CHATS
    if shape == "alpaca":  # the instruction is the system prompt's text, joined to the input
        expected = [(("user", f"Answer briefly.\n\n{c[-2][1]}"), c[-1]) for c in PAIRS]
    assert chats == list(expected)
    skipped = records[len(good) :]
    assert all(isinstance(r, Skip) for r in skipped)
    assert Counter(r.reason for r in skipped) == Counter(skips)


def test_reasoning_fields_become_think_blocks_and_odd_rows_do_not_set_the_shape(tmp_path):
    turns = [{"role": "user", "content": "2+2?", "reasoning_content": None},
             {"role": "assistant", "content": "4", "reasoning_content": "2+2=4\n"}]  # fmt: skip
    rows = [{"messages": turns}] * 3 + [{"messages": None, "text": "a stray text row"}]
    (msg,) = {r.messages[1]["content"] for r in _read(f"hf:{_write(tmp_path / 'r', rows)}")[:3]}
    assert msg == "<think>\n2+2=4\n</think>\n\n4"
    prose = [{"text": f"Plain prose {i}, nothing like a chat."} for i in range(4)]
    chatty = {"text": "User: hi\nAssistant: hello"}  # one row of five: the source stays text
    docs = _read(f"hf:{_write(tmp_path / 'p', [*prose, chatty])}")
    assert [d.text for d in docs] == [r["text"] for r in [*prose, chatty]]


def test_a_source_of_no_known_shape_stops_at_once_naming_its_keys(tmp_path):
    folder = _write(tmp_path / "odd", [{"frage": "q", "antwort": "a"}] * 3)
    with pytest.raises(DataError, match=r"hf:.*odd\[0\]: unrecognised row; keys are "
                       r"\['antwort', 'frage'\].*field_map"):  # fmt: skip
        open_source({"path": f"hf:{folder}"}, "data.sources[0]")
    fmap = {"prompt": "frage", "response": "antwort"}
    source = open_source({"path": f"hf:{folder}", "field_map": fmap}, "data.sources[0]")
    assert source[2].messages == ({"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "a"})  # fmt: skip


def test_stage_c_reads_the_seed_datasets_by_their_hub_names(tmp_path, monkeypatch, caplog):
    """The hub is not reachable here: its two names load local folders in the seed's shapes
    (ThaiChatbotConversation's is undocumented: a ShareGPT list stands in)."""
    caplog.set_level(logging.INFO, logger="hanuman_jax")
    sharegpt = [{"conversations": _turns(c, "from", "value", {"user": "human", "assistant":
                                                               "gpt"})} for c in CHATS]  # fmt: skip
    thinking = [{"instruction": c[-2][1], "input": "", "output": c[-1][1]} for c in PAIRS]
    hub = {
        "ZombitX64/ThaiChatbotConversation": _write(tmp_path / "thai", sharegpt),
        "HelpingAI/Intermediate-Thinking-130k": _write(tmp_path / "it", thinking, "t.jsonl"),
    }
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, *a, **k: real(str(hub.get(name, name)), *a, **k))  # fmt: skip
    cfg = load_config(ROOT / "configs" / "stage_c_sft.py")
    seed = [dict(s) for s in cfg.data.sources if s["path"].startswith("hf:")]
    assert [(s["path"], s["max_examples"]) for s in seed] == [
        ("hf:ZombitX64/ThaiChatbotConversation", 10_000),
        ("hf:HelpingAI/Intermediate-Thinking-130k", 10_000),
    ]
    assert any(not s["path"].startswith("hf:") for s in cfg.data.sources)  # local chat files too
    sources = [open_source(s, f"data.sources[{i}]") for i, s in enumerate(seed)]
    assert [len(s) for s in sources] == [3, 2]
    assert sources[1][1].messages[1]["content"] == "<think>2+2=4</think>\n4"
    assert "hf:ZombitX64/ThaiChatbotConversation holds chat turns: 'conversations'" in caplog.text


def test_tiny_stage_c_trains_on_every_source_kind_of_stage_c(caplog):
    caplog.set_level(logging.INFO, logger="hanuman_jax")
    cfg = load_config(ROOT / "configs" / "tiny_stage_c.py", ["--config.train.batch_size=2"])
    kinds = [s["path"].split(":")[0] for s in cfg.data.sources]
    assert kinds == ["hf", "hf", "bundled"] and cfg.data.sources[0]["max_examples"] == 20
    it = iter(make_dataset(cfg, resolve_file(cfg.data.tokenizer), prefetch=0))
    stats = [next(it)["stats"] for _ in range(6)][-1]
    assert all(n > 0 for n in stats["source_tokens"])  # every source is read
    assert dict(zip(SKIP_REASONS, stats["skipped"], strict=True)) == dict.fromkeys(SKIP_REASONS, 0)
    assert "hf:bundled:thai_chatbot holds transcripts: 'text' with speaker tags" in caplog.text
    assert "hf:bundled:thinking holds prompt/answer pairs: 'instruction'" in caplog.text
