"""Row shapes, read one way by the data pipeline and the tokenizer trainer.

A source's rows hold their documents in one of these shapes (`Shape`, found from its first rows
by `detect_shape`; field names match in any letter case):
- chat turns: a list under `messages`, `conversations`, `conversation`, `dialogue`, `dialog`,
  `chat` or `turns`, of `role`/`content`, `from`/`value` (ShareGPT), `role`/`text` or
  `speaker`/`text` turns; an assistant turn's `reasoning_content` / `thinking` / `reasoning`
  field becomes a `<think>` block before its reply;
- a prompt and an answer under common names (`PROMPTS` x `ANSWERS`: instruction/output, with
  `input` or `context` joined to the instruction, as in Intermediate-Thinking-130k; prompt/
  response or completion; question/answer; query/response; input/output; user/assistant;
  human/gpt; คำถาม/คำตอบ...), with an optional `system` prompt and reasoning field;
- a transcript: one string (`text`, `conversation`...) with speaker tags (transcripts.py);
  under `text` or `content`, which usually hold prose, a user and an assistant tag must each
  start a line (or be chat markup: ChatML, Llama's [INST]);
- plain text: `text` or `content`, optionally with `title` (joined by a newline).
All but plain text become chats, whose `<think>...</think>` blocks are kept verbatim.
Every reader of records (the sources and the tokenizer trainer) reads each one through
`read_record`, so that a record its reader cannot take is a `Skip`, never a crash.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from hanuman_jax.data.transcripts import describe as describe_style
from hanuman_jax.data.transcripts import detect_style, split_transcript

ROLE_ALIASES = {
    "system": "system", "user": "user", "human": "user", "ผู้ใช้": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "ai": "assistant", "chatbot": "assistant", "ผู้ช่วย": "assistant",
}  # fmt: skip
TURN_LISTS = ("messages", "conversations", "conversation", "dialogue", "dialog", "chat", "turns")
TURN_KEYS = (("role", "content"), ("from", "value"), ("role", "text"), ("speaker", "text"))
# A pair is the first of PROMPTS and the first of ANSWERS that a row holds as strings.
PROMPTS = ("instruction", "prompt", "question", "query", "input", "user", "human", "context",
           "message", "คำถาม", "ถาม")  # fmt: skip
ANSWERS = ("output", "response", "answer", "completion", "assistant", "gpt", "bot", "ai", "reply",
           "target", "คำตอบ", "ตอบ")  # fmt: skip
INPUTS = ("input", "context")  # joined to an instruction
SYSTEMS = ("system", "system_prompt")
THINKING = ("reasoning_content", "thinking", "reasoning")  # the reasoning before an answer
TRANSCRIPTS = ("text", "content", "conversation", "dialogue", "dialog", "chat", "transcript")
TEXTS = ("text", "content")
EXPECTED = (
    "a list of chat turns (messages, conversations...), a prompt and an answer (instruction/"
    "output, question/answer, prompt/response...), a transcript with speaker tags, or text"
)
DETECT_SAMPLE = 32  # usable rows a source's shape is chosen from (the most common shape wins)


class DataError(ValueError):
    """Unusable input data; the message names the file (and line) and what to change."""


@dataclass(frozen=True)
class Skip:
    """A record the pipeline passes over (and counts); `data.strict` turns it into an error."""

    reason: str  # one of sources.SKIP_REASONS
    where: str  # file:line, or source[index]
    message: str

    def error(self) -> DataError:
        return DataError(f"{self.where}: {self.message} (data.strict=True stops at the first)")


def read_record(where: str, read: Callable, *args):
    """`read(*args)`, or the Skip saying why it raised: whatever one record makes its reader raise
    (bad UTF-8 or JSON, JSON nested past the parser's recursion limit, a field of the wrong type,
    a library's own error) costs that record, never the run. An unreadable file still stops."""
    try:
        return read(*args)
    except OSError as e:
        raise DataError(f"{where}: cannot be read ({e})") from None
    except UnicodeDecodeError as e:
        return Skip("invalid_utf8", where, f"not UTF-8 ({e.reason})")
    except json.JSONDecodeError as e:
        return Skip("malformed_json", where, f"invalid JSON ({e.msg})")
    except RecursionError:
        return Skip("malformed_json", where, "nested too deeply to read")
    except DataError as e:
        return Skip("missing_field", where, str(e).removeprefix(f"{where}: "))
    except Exception as e:  # noqa: BLE001 (any other error of one record is that record's)
        return Skip("missing_field", where, f"unreadable ({type(e).__name__}: {e})"[:300])


@dataclass(frozen=True)
class Document:
    text: str | None = None
    messages: tuple[dict, ...] | None = None

    def texts(self) -> list[str]:
        """The strings in the document (what a tokenizer is trained on)."""
        return [self.text] if self.messages is None else [m["content"] for m in self.messages]


def _string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _names(row: dict) -> dict[str, str]:
    """Lower-cased field name -> the row's own spelling, for the fields that hold something."""
    return {k.lower(): k for k, v in row.items() if v is not None and isinstance(k, str)}


def _first(row: dict, names: dict[str, str], keys: tuple[str, ...]) -> str | None:
    """The row's spelling of the first of `keys` that holds a string."""
    return next((names[k] for k in keys if isinstance(row.get(names.get(k)), str)), None)


@dataclass(frozen=True)
class Shape:
    """How a source's rows hold their documents (see the module docstring)."""

    kind: str  # "turns", "pair", "transcript" or "text"
    keys: tuple[str, ...] = ()  # turns: list, role, text; pair: prompt, answer; transcript: text
    style: str = ""  # a transcript's speaker tags (transcripts.STYLES)

    def describe(self) -> str:
        """What the log says a source holds."""
        if self.kind == "turns":
            return f"chat turns: {self.keys[0]!r}, a list of {self.keys[1]}/{self.keys[2]}"
        if self.kind == "pair":
            joined = " (+ input)" if self.keys[0].lower() == "instruction" else ""
            return f"prompt/answer pairs: {self.keys[0]!r}{joined} -> {self.keys[1]!r}"
        if self.kind == "transcript":
            return f"transcripts: {self.keys[0]!r} with speaker tags {describe_style(self.style)}"
        return "plain text: 'text' or 'content' (+ 'title')"

    def read(self, row: dict, where: str) -> Document | None:
        """The row's document; None when it holds nothing to train on; DataError when it does
        not fit the shape (skipped and counted by the sources)."""
        for key in self.keys[: 1 if self.kind == "turns" else 2]:
            if row.get(key) is None:
                raise DataError(f"{where}: {key!r} is missing or null in this row; its source "
                                f"holds {self.describe()}; keys are {sorted(row)}")  # fmt: skip
        return _READERS[self.kind](self, row, where)


def _with_thinking(answer: str, holder: dict) -> str:
    """The answer after its reasoning as a `<think>` block, when `holder` has one apart."""
    thinking = _first(holder, _names(holder), THINKING)
    if not thinking or not holder[thinking].strip() or "<think>" in answer:
        return answer
    return f"<think>\n{holder[thinking].strip()}\n</think>\n\n{answer.lstrip()}"


def _read_turns(shape: Shape, row: dict, where: str) -> Document | None:
    key, role_key, text_key = shape.keys
    turns = row[key]
    if not isinstance(turns, list):
        raise DataError(f"{where}: {key!r} must be a list of turns")
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        role = ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
        if role is None or not isinstance(turn.get(text_key), str):
            raise DataError(
                f"{where}: {key}[{i}] must be {{{role_key!r}: one of "
                f"{', '.join(ROLE_ALIASES)}, {text_key!r}: str}}, got {str(turn)[:120]}"
            )
        text = _with_thinking(turn[text_key], turn) if role == "assistant" else turn[text_key]
        messages.append({"role": role, "content": text})
    return Document(messages=tuple(messages)) if messages else None


def _read_pair(shape: Shape, row: dict, where: str) -> Document | None:
    prompt_key, answer_key = shape.keys
    names = _names(row)
    prompt = _string(row, prompt_key, where)
    if prompt_key.lower() == "instruction":
        inputs = [_string(row, names[k], where) for k in INPUTS if k in names]
        prompt = "\n\n".join(p for p in (prompt, *inputs) if p.strip())
    answer = _with_thinking(_string(row, answer_key, where), row)
    if not prompt.strip() or not answer.strip():
        return None
    system = _first(row, names, SYSTEMS)
    head = ({"role": "system", "content": row[system]},) if system and row[system].strip() else ()
    return Document(messages=(*head, {"role": "user", "content": prompt},
                              {"role": "assistant", "content": answer}))  # fmt: skip


def _read_transcript(shape: Shape, row: dict, where: str) -> Document | None:
    key = shape.keys[0]
    messages = split_transcript(_string(row, key, where), shape.style)
    if messages is None:
        raise DataError(f"{where}: {key!r} holds no user turn and reply with the speaker tags "
                        f"{describe_style(shape.style)}")  # fmt: skip
    return Document(messages=messages)


def _read_text(shape: Shape, row: dict, where: str) -> Document | None:
    names = _names(row)
    key = next((names[k] for k in TEXTS if k in names), None)
    if key is None:
        raise _unrecognised(row, where)
    text, title = _string(row, key, where), _string(row, names.get("title", "title"), where)
    text = f"{title}\n{text}" if title and text else title or text
    return Document(text=text) if text else None


_READERS = {"turns": _read_turns, "pair": _read_pair, "transcript": _read_transcript,
            "text": _read_text}  # fmt: skip


def shape_of(row: dict) -> Shape | None:
    """The shape one row has (the first that fits, in the module docstring's order), or None."""
    names = _names(row)
    for key in TURN_LISTS:
        turns = row.get(names.get(key))
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            keys = next(((r, t) for r, t in TURN_KEYS if r in turns[0] and t in turns[0]), None)
            if keys:
                return Shape("turns", (names[key], *keys))
    prompt, answer = _first(row, names, PROMPTS), _first(row, names, ANSWERS)
    if prompt and answer:
        return Shape("pair", (prompt, answer))
    for key in TRANSCRIPTS:
        value = row.get(names.get(key))
        style = detect_style(value, key not in TEXTS) if isinstance(value, str) else None
        if style:
            return Shape("transcript", (names[key],), style)
    return Shape("text") if any(k in names for k in TEXTS) else None


def detect_shape(rows: list[tuple[str, dict]]) -> Shape:
    """The shape most of `rows` (where, row) have (ties: the first seen); a DataError naming the
    keys found when most fit none."""
    shapes = [shape_of(row) for _, row in rows]
    best = Counter(shapes).most_common(1)[0][0]
    if best is None:
        where, row = rows[shapes.index(None)]
        raise _unrecognised(row, where)
    return best


def readable_fields(names: list[str]) -> list[str]:
    """Those of a table's column `names` that some shape reads (Parquet loads only these)."""
    lower = {n.lower(): n for n in names}
    wanted = [k for k in TURN_LISTS + TRANSCRIPTS if k in lower]
    if any(k in lower for k in PROMPTS) and any(k in lower for k in ANSWERS):
        wanted += [k for k in PROMPTS + ANSWERS + INPUTS + SYSTEMS + THINKING if k in lower]
    if wanted and "title" in lower:
        wanted.append("title")
    return [n for n in names if n.lower() in wanted]


def _unrecognised(row: dict, where: str) -> DataError:
    return DataError(
        f"{where}: unrecognised row; keys are {sorted(row)}; expected {EXPECTED}, or map the keys "
        "with the source's field_map, e.g. {'prompt': 'frage', 'response': 'antwort'}"
    )


def map_fields(row: dict, where: str, field_map: dict[str, str] | None) -> dict:
    """`field_map` (our name -> the row's, e.g. {"prompt": "frage"}) renames a row's fields for
    datasets with their own names; the row's other fields are then ignored."""
    if not field_map:
        return row
    missing = sorted(theirs for theirs in field_map.values() if theirs not in row)
    if missing:
        raise DataError(f"{where}: field_map names {missing}, not in this row's keys {sorted(row)}")
    return {ours: row[theirs] for ours, theirs in field_map.items()}


def row_to_document(
    row, where: str, field_map: dict[str, str] | None = None, shape: Shape | None = None
) -> Document | None:
    """The document a row holds, read in `shape` (by default the row's own: `shape_of`); None
    when it holds nothing to train on."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row = map_fields(row, where, field_map)
    shape = shape or shape_of(row)
    if shape is None:
        raise _unrecognised(row, where)
    return shape.read(row, where)
