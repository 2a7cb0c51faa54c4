"""JSONL row schemas, read one way by the data pipeline and the tokenizer trainer.

- plain text: `text` or `content`, optionally with `title` (joined by a newline);
- instruction: `instruction` (+ optional `input`) and `output`, e.g. Intermediate-Thinking-130k,
  whose `<think>...</think>` blocks are kept verbatim;
- prompt / response pairs;
- chat: `messages` of `role`/`content`, or `conversations` of `from`/`value` (ShareGPT roles).
Instruction and pair rows become a user turn and an assistant turn.
Every reader of records (the sources and the tokenizer trainer) reads each one through
`read_record`, so that a record its reader cannot take is a `Skip`, never a crash.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
CHATS = {"messages": ("role", "content"), "conversations": ("from", "value")}
PAIRS = (("instruction", "output"), ("prompt", "response"))
TEXTS = ("text", "content")
EXPECTED = (
    "text or content (+ title), instruction/input/output, prompt/response, "
    "messages (role/content) or conversations (from/value)"
)


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


def _chat(turns, key: str, where: str) -> tuple[dict, ...]:
    role_key, text_key = CHATS[key]
    if not isinstance(turns, list):
        raise DataError(f"{where}: {key!r} must be a list of turns")
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        role = ROLE_ALIASES.get(role) if isinstance(role, str) else None
        if role is None or not isinstance(turn.get(text_key), str):
            raise DataError(
                f"{where}: {key}[{i}] must be {{{role_key!r}: one of "
                f"{', '.join(ROLE_ALIASES)}, {text_key!r}: str}}, got {str(turn)[:120]}"
            )
        messages.append({"role": role, "content": turn[text_key]})
    return tuple(messages)


def schema_of(row: dict) -> str | None:
    """The schema family a row belongs to: "chat" (messages, conversations, instruction or
    prompt/response pairs), "text", or None if unrecognised."""
    if any(key in row for key in CHATS) or any(a in row and b in row for a, b in PAIRS):
        return "chat"
    if any(key in row for key in TEXTS):
        return "text"
    return None


def _unrecognised(row: dict, where: str) -> DataError:
    return DataError(
        f"{where}: unrecognised row; keys are {sorted(row)}; expected {EXPECTED}, or map the keys "
        "with the source's field_map, e.g. {'instruction': 'question', 'output': 'answer'}"
    )


def row_to_document(
    row, where: str, field_map: dict[str, str] | None = None, schema: str | None = None
) -> Document | None:
    """The document a row holds; None when a recognised row has no text.

    `field_map` (our name -> the row's name, e.g. {"instruction": "question"}) renames a row's
    fields for datasets with their own schema; the row's other fields are then ignored.
    `schema` (from `schema_of` on a source's first rows) makes a row of another family an error.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if field_map:
        missing = sorted(theirs for theirs in field_map.values() if theirs not in row)
        if missing:
            raise DataError(f"{where}: field_map names {missing}, not in this row's keys "
                            f"{sorted(row)}")  # fmt: skip
        row = {ours: row[theirs] for ours, theirs in field_map.items()}
    family = schema_of(row)
    if family is None:
        raise _unrecognised(row, where)
    if schema is not None and family != schema:
        raise DataError(
            f"{where}: a {family} row in a source whose first rows are {schema} rows; "
            f"keys are {sorted(row)}"
        )
    key = next((k for k in CHATS if k in row), None)
    if key is not None:
        messages = _chat(row[key], key, where)
        return Document(messages=messages) if messages else None
    if family == "chat":
        prompt_key, answer_key = next((a, b) for a, b in PAIRS if a in row and b in row)
        prompt = _string(row, prompt_key, where)
        if prompt_key == "instruction" and _string(row, "input", where):
            prompt = f"{prompt}\n\n{row['input']}"
        answer = _string(row, answer_key, where)
        if not prompt and not answer:
            return None
        return Document(
            messages=({"role": "user", "content": prompt},
                      {"role": "assistant", "content": answer})
        )  # fmt: skip
    key = next(k for k in TEXTS if k in row)
    text, title = _string(row, key, where), _string(row, "title", where)
    text = f"{title}\n{text}" if title and text else title or text
    return Document(text=text) if text else None
