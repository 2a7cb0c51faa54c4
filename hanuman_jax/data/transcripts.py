"""Chats kept as one string with speaker tags, split back into turns.

Styles, tried in this order on a source's first rows (schemas.py keeps the one most rows take):
- chatml: `<|im_start|>user ... <|im_end|>`;
- llama: `<s>[INST] <<SYS>> ... <</SYS>> ... [/INST] ... </s>`;
- headings: `### Instruction:` / `### Input:` / `### Response:` lines (Alpaca's text form);
- speaker: `User:` / `Assistant:` (Human/AI/Bot/Q/A, Thai ผู้ใช้/ผู้ช่วย, ถาม/ตอบ...) at a line's start;
- inline: the same names after any space, for transcripts written on one line; tried only under
  keys that name a transcript (`conversation`...), as prose under `text` quotes a "Q:" or "user:".
Text before the first tag is a system turn, consecutive turns of one role are joined, and a
string that does not hold a user turn answered by a non-empty assistant turn is no transcript.
"""

from __future__ import annotations

import re

SPEAKERS = {
    "user": "user", "human": "user", "question": "user", "q": "user",
    "ผู้ใช้": "user", "คำถาม": "user", "ถาม": "user",
    "assistant": "assistant", "ai": "assistant", "bot": "assistant", "chatbot": "assistant",
    "gpt": "assistant", "answer": "assistant", "a": "assistant",
    "ผู้ช่วย": "assistant", "คำตอบ": "assistant", "ตอบ": "assistant", "บอท": "assistant",
    "system": "system", "ระบบ": "system",
}  # fmt: skip
HEADINGS = {
    "instruction": "user", "input": "user", "question": "user", "user": "user",
    "response": "assistant", "answer": "assistant", "output": "assistant",
    "assistant": "assistant", "system": "system",
}  # fmt: skip
_NAMES = "|".join(sorted(map(re.escape, SPEAKERS), key=len, reverse=True))
_MARKERS = {"[INST]": "user", "[/INST]": "assistant", "<<SYS>>": "system", "<</SYS>>": "user"}
STYLES = {  # name: (tag pattern with group 1 the speaker, speaker -> role, how the log shows it)
    "chatml": (re.compile(r"<\|im_start\|>[ \t]*(system|user|assistant)[ \t]*\n?"),
               {r: r for r in ("system", "user", "assistant")}, "<|im_start|>user ... <|im_end|>"),
    "llama": (re.compile(r"(\[INST\]|\[/INST\]|<<SYS>>|<</SYS>>)"), _MARKERS,
              "[INST] ... [/INST]"),
    "headings": (re.compile(rf"^[ \t]*#{{1,4}}[ \t]*({'|'.join(HEADINGS)})[ \t]*:?[ \t]*$\n?",
                            re.I | re.M), HEADINGS, "### Instruction: / ### Response:"),
    "speaker": (re.compile(rf"^[ \t]*\**({_NAMES})\**[ \t]*[:：]", re.I | re.M), SPEAKERS,
                "'Name:' at line starts (User/Assistant, Human/AI, ผู้ใช้/ผู้ช่วย...)"),
    "inline": (re.compile(rf"(?:^|(?<=\s))\**({_NAMES})\**[ \t]*[:：]", re.I), SPEAKERS,
               "'Name:' within lines (User/Assistant, Human/AI, ผู้ใช้/ผู้ช่วย...)"),
}  # fmt: skip
# Markers some formats leave around a turn's text: not part of what was said.
_EDGES = re.compile(r"^(?:\s|</?s>|<\|im_end\|>|<\|endoftext\|>)+|(?:\s|</?s>|<\|im_end\|>|"
                    r"<\|endoftext\|>)+$")  # fmt: skip


def split_transcript(text: str, style: str) -> tuple[dict, ...] | None:
    """The turns `text` holds in `style`, or None if it is no transcript in that style."""
    pattern, roles, _ = STYLES[style]
    tags = list(pattern.finditer(text))
    if not tags:
        return None
    turns = [("system", text[: tags[0].start()])]
    for tag, after in zip(tags, [*tags[1:], None], strict=True):
        end = len(text) if after is None else after.start()
        name = tag.group(1)
        turns.append((roles.get(name) or roles[name.lower()], text[tag.end() : end]))
    messages: list[dict] = []
    for role, content in turns:
        content = _EDGES.sub("", content)
        if not content:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    roles_seen = [m["role"] for m in messages]
    if "user" not in roles_seen or "assistant" not in roles_seen[roles_seen.index("user") :]:
        return None
    return tuple(messages)


def detect_style(text: str, inline: bool = True) -> str | None:
    """The first style in which `text` is a transcript, or None; `inline=False` leaves out the
    inline style, whose tags a field of prose holds by chance ("the interview. Q: ...")."""
    styles = [s for s in STYLES if inline or s != "inline"]
    return next((s for s in styles if split_transcript(text, s) is not None), None)


def describe(style: str) -> str:
    return STYLES[style][2]
