"""The `Tokenizer` every module uses, the fixed special ids, and the normalization table.

Normalization lives inside the SentencePiece model (`normalization_rule_tsv` at training), so
SentencePiece itself, our `Tokenizer`, and the exported Hugging Face tokenizers (slow and fast)
normalize identically. The table:

- NFC: every precomposed BMP character from its canonical decomposition, plus the canonical
  reordering of Thai marks (a tone mark typed before a below vowel, e.g. ก + ่ + ุ -> กุ่).
  `Tokenizer.encode` also applies Python's full NFC first, for sequences the table lacks.
- Quotes and dashes folded to ASCII, no-break and other fixed-width spaces to a space, and
  invisible characters (zero-width space, word joiner, BOM, soft hyphen) removed: see `FOLD`.
- A run of spaces that holds a no-break space is one space: see `NBSP_RUNS`.
- Thai digits ๐-๙ kept (default) or mapped to 0-9 (`thai_digits="to-arabic"`).
- A newline (LF, CR or CRLF) becomes the `<nl>` symbol, so it survives SentencePiece.

One rule needs to know where a line starts, which SentencePiece's table cannot: a model trained
since 2026-12-06 (`WORD_SPACE`) puts a space before an ASCII letter that starts a line (after
any spaces there), so that an English word is the same "▁word" piece at the start of a line as
after a space, and decode takes the space away again. Thai, written without spaces between
words, gets none. `Tokenizer` and the Hugging Face export apply it; SentencePiece on its own
encodes the same text without it (still losslessly, in more pieces).
"""

from __future__ import annotations

import functools
import itertools
import re
import string
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

UNK, BOS, EOS, PAD = "<unk>", "<bos>", "<eos>", "<pad>"
NEWLINE, SEP = "<nl>", "<sep>"  # SEP starts each chat turn (`Tokenizer.encode_chat`)
LANG_TAGS = {"en": "<lang_en>", "th": "<lang_th>", "xx": "<lang_xx>"}
USER_SYMBOLS = (NEWLINE, *LANG_TAGS.values(), "<translate>", "<copy>", SEP)
THAI_DIGITS = "๐๑๒๓๔๕๖๗๘๙"
ARABIC_DIGITS = "0123456789"
# Fixed ids: <unk> 0, <bos> 1, <eos> 2, <pad> 3, then USER_SYMBOLS 4-10, then the 256 byte
# pieces <0x00>-<0xFF> (11-266). The digits 0-9 and ๐-๙ are always pieces (required_chars).
SPECIAL_IDS = {UNK: 0, BOS: 1, EOS: 2, PAD: 3} | {s: 4 + i for i, s in enumerate(USER_SYMBOLS)}
BYTE_OFFSET = 4 + len(USER_SYMBOLS)  # id of <0x00>
ROLES = ("system", "user", "assistant")

FOLD = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",  # ‘ ’ ‚ ‛ ′
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',  # “ ” „ ‟ ″
    "\u00ab": '"', "\u00bb": '"',  # « »
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-",  # ‐ ‑ ‒ – —
    "\u2015": "-", "\u2212": "-", "\ufe63": "-", "\uff0d": "-",  # ― − ﹣ －
    # no-break, fixed-width and ideographic spaces are spaces
    "\u00a0": " ", **{chr(c): " " for c in range(0x2000, 0x200B)}, "\u202f": " ",
    "\u205f": " ", "\u3000": " ",
    # invisible: zero-width space, word joiner, byte-order mark, soft hyphen (not ZWJ: emoji)
    "\u200b": "", "\u2060": "", "\ufeff": "", "\u00ad": "",
}  # fmt: skip
# Web text pads with &nbsp; ("ว่า \xa0รัฐบาล"): a run of spaces holding a no-break space is one
# space, where it would cost a token per extra space: 0.7 % more characters per token on
# held-out thaigov news, 0.5 % on all held-out Thai (BENCHMARKS.md, "Tokenizer"). Runs of up
# to NBSP_RUN characters are rules (a longer run leaves a space per NBSP_RUN); runs of ordinary
# spaces are kept (indentation, and Thai's double space between sentences). Models trained
# before these rules keep their runs.
NBSP_RUN = 8
NBSP_RUNS = {
    "".join(run): " "
    for n in range(2, NBSP_RUN + 1)
    for run in itertools.product(" \u00a0", repeat=n)
    if "\u00a0" in run
}
# SentencePiece's normalizer takes the longest rule at each position: the same as this regex
NBSP_RUN_PATTERN = f"(?=[ \u00a0]{{0,{NBSP_RUN - 1}}}\u00a0)[ \u00a0]{{1,{NBSP_RUN}}}"
_NBSP_RUN = re.compile(NBSP_RUN_PATTERN)
NEWLINES = {"\r\n": NEWLINE, "\r": NEWLINE, "\n": NEWLINE}
DIGITS_TO_ARABIC = dict(zip(THAI_DIGITS, ARABIC_DIGITS, strict=True))
_TRANSLATE = {"keep": str.maketrans(FOLD), "to-arabic": str.maketrans(FOLD | DIGITS_TO_ARABIC)}
# SentencePiece's rules remove these, but a text of nothing else still encodes to a lone "▁"
# there, and to nothing in Hugging Face's tokenizer: `Tokenizer.encode` returns nothing too.
INVISIBLE = "".join(k for k, v in FOLD.items() if not v)
_INVISIBLE = str.maketrans(dict.fromkeys(INVISIBLE))


def _typed(name: str) -> str:
    """A regex for `name` as SentencePiece reads it in text: invisible characters may sit
    between its letters, as the table removes them first."""
    return f"[{re.escape(INVISIBLE)}]*".join(map(re.escape, name))


_SYMBOL_TEXT = re.compile("|".join(map(_typed, USER_SYMBOLS)))
SPACE = "\u2581"  # a space, as SentencePiece writes it in pieces


def is_space_run(piece: str) -> bool:
    """Whether a piece is spaces only (one or more "▁")."""
    return bool(piece) and not piece.strip(SPACE)


# The normalizer_spec.name of a model whose lines' first ASCII words get a space (see above)
WORD_SPACE = "nfc_word_space"
LATIN = "A-Za-z"
# What the table turns into spaces or removes: before a line's first letter, as spaces are
_BLANK = re.escape("".join(sorted({" ", "\u2581", *(k for k, v in FOLD.items() if v in " ")})))
# A line starts at a newline, and at <sep> (a chat turn's role follows it)
_BREAK_WORD = re.compile(
    f"(\r\n|[\r\n]|{_typed(NEWLINE)}|{_typed(SEP)})(?=[{_BLANK}]*[{LATIN}])"
)  # "▁" goes after group 1
_FIRST_WORD = re.compile(f"[{_BLANK}]*[{LATIN}]")
_BREAK_WORD_SPACE = re.compile(f"(?:(?<=\n)|(?<={SEP})) (?= *[{LATIN}])")  # in decoded text
_FIRST_WORD_SPACE = re.compile(f" +[{LATIN}]")
_THAI_MARKS = [chr(c) for c in (0x0E31, *range(0x0E34, 0x0E3B), *range(0x0E47, 0x0E4F))]
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.S)


def normalization_rules(thai_digits: str = "keep", nbsp_runs: bool = True) -> dict[str, str]:
    """Source string -> replacement, as compiled into the SentencePiece model."""
    if thai_digits not in ("keep", "to-arabic"):
        raise ValueError(f"thai_digits={thai_digits!r}: expected keep or to-arabic")
    rules: dict[str, str] = {}
    for code in range(0x10000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        decomposed = unicodedata.normalize("NFD", char)
        if decomposed != char and unicodedata.normalize("NFC", decomposed) == char:
            rules[decomposed] = char
    for a in _THAI_MARKS:
        for b in _THAI_MARKS:
            if unicodedata.normalize("NFC", a + b) != a + b:
                rules[a + b] = unicodedata.normalize("NFC", a + b)
    rules |= FOLD | NEWLINES | (NBSP_RUNS if nbsp_runs else {})
    if thai_digits == "to-arabic":
        rules |= DIGITS_TO_ARABIC
    return rules


def rules_tsv(rules: dict[str, str]) -> str:
    """SentencePiece's normalization TSV: hex code points of source and target."""

    def hexes(s: str) -> str:
        return " ".join(f"{ord(c):X}" for c in s)

    return "".join(f"{hexes(src)}\t{hexes(dst)}\n" for src, dst in rules.items())


def normalize(text: str, thai_digits: str = "keep", nbsp_runs: bool = True) -> str:
    """The text a model trained with these rules sees, newlines kept as newlines: what training
    samples (`Tokenizer.normalize` gives a trained model's own)."""
    text = unicodedata.normalize("NFC", text)
    text = (_NBSP_RUN.sub(" ", text) if nbsp_runs else text).translate(_TRANSLATE[thai_digits])
    # A literal "<nl>" in the text is the newline symbol too: the model cannot tell them apart.
    return text.replace("\r\n", "\n").replace("\r", "\n").replace(NEWLINE, "\n")


def with_word_spaces(text: str, line_start: bool = True) -> str:
    """`text` with a "▁" (a space to SentencePiece) before each ASCII letter that starts a line,
    after any spaces or invisible characters there (`WORD_SPACE`); with `line_start`, the
    start of the text is a line start too. What `Tokenizer.encode` and training encode."""
    if "\n" in text or "\r" in text or "<" in text:
        text = _BREAK_WORD.sub("\\1\u2581", text)
    return "\u2581" + text if line_start and _FIRST_WORD.match(text) else text


def drop_thinking(text: str) -> str:
    """A reply without its `<think>...</think>` blocks (all of them, and the space after each):
    what a later turn keeps of it at inference. An unclosed block stays."""
    return _THINK_BLOCK.sub("", text)


class Tokenizer:
    """Encode/decode text and chats; the special ids every other module uses."""

    def __init__(self, model_file: str | Path):
        self.path = Path(model_file)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.path} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path} is not a SentencePiece model ({e})") from None
        found = {p: self.sp.piece_to_id(p) for p in SPECIAL_IDS}
        if found != SPECIAL_IDS:
            wrong = {p: i for p, i in found.items() if SPECIAL_IDS[p] != i}
            raise ValueError(
                f"tokenizer model {self.path} does not have the fixed special ids (got {wrong}); "
                "train it with `python -m hanuman_jax.tokenizer train`"
            )
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = 0, 1, 2, 3
        self.nl_id = SPECIAL_IDS[NEWLINE]
        self.sep_id = SPECIAL_IDS[SEP]
        self.thai_digits = "to-arabic" if self.sp.encode("๑") == self.sp.encode("1") else "keep"

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def lang_id(self, lang: str) -> int:
        """The id of a language tag: en, th or xx."""
        return SPECIAL_IDS[LANG_TAGS[lang]]

    def normalize(self, text: str) -> str:
        """The text that `decode(encode(text))` gives back: this model's own normalization (a
        model trained by an older version may lack some of today's rules), newlines kept."""
        text = self.sp.normalize(unicodedata.normalize("NFC", text))
        if self._dummy_prefix:
            text = text.removeprefix("▁")
        return text.replace("▁", " ").replace(NEWLINE, "\n")

    @functools.cached_property
    def _dummy_prefix(self) -> bool:
        """Whether SentencePiece puts a space before every text it encodes (models trained
        before 2026-12-06)."""
        return self._normalizer_spec.add_dummy_prefix

    @functools.cached_property
    def _word_space(self) -> bool:
        """Whether this model puts a space before an ASCII letter that starts a line (models
        trained since 2026-12-06: `WORD_SPACE`)."""
        return self._normalizer_spec.name == WORD_SPACE

    @functools.cached_property
    def _normalizer_spec(self) -> sentencepiece_model_pb2.NormalizerSpec:
        """The model's normalizer settings, read once from its proto (megabytes at 96k pieces)."""
        proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())
        return proto.normalizer_spec

    def encode(self, text: str) -> list[int]:
        return self._encode(text, line_start=True)

    def _encode(self, text: str, line_start: bool) -> list[int]:
        """`line_start`: the text starts a line (a document, a chat turn's role or content), not
        a continuation of one (text after a symbol's name spelled in bytes)."""
        text = unicodedata.normalize("NFC", text)
        if self._word_space:
            text = with_word_spaces(text, line_start)
        ids = self.sp.encode(text)
        if len(ids) == 1 and not text.translate(_INVISIBLE):
            return []
        return ids

    def encode_literal(self, text: str) -> list[int]:
        """Like `encode`, but a symbol's name typed in the text (e.g. "<sep>") is spelled out in
        byte pieces, so that user content cannot forge chat structure."""
        ids, start, line_start = [], 0, True
        text = unicodedata.normalize("NFC", text)  # as SentencePiece reads it (">" + U+0338 is "≯")
        for match in _SYMBOL_TEXT.finditer(text):
            ids += self._encode(text[start : match.start()], line_start)
            name = match.group().translate(_INVISIBLE)
            ids += [BYTE_OFFSET + b for b in name.encode("utf-8")]
            # decode reads a spelled "<nl>" or "<sep>" as the symbol: a line starts after it
            start, line_start = match.end(), name in (NEWLINE, SEP)
        return ids + self._encode(text[start:], line_start)

    def decode(self, ids: Sequence[int], *, line_start: bool = True) -> str:
        """The text of `ids`. `line_start=False` for ids that continue a line (a continuation of
        a prompt that does not end at a line start): a space they start with is the text's."""
        ids = [int(i) for i in ids]
        text = self.sp.decode(ids).replace(NEWLINE, "\n")
        if self._word_space:
            text = _BREAK_WORD_SPACE.sub("", text) if "\n" in text or SEP in text else text
            return text[1:] if line_start and _FIRST_WORD_SPACE.match(text) else text
        first = next((i for i in ids if not self.sp.is_control(i)), None)
        if self._dummy_prefix and not line_start and first is not None:
            # SentencePiece took the first piece's space for its dummy prefix
            text = " " + text if self.sp.id_to_piece(first)[0] == "▁" else text
        return text

    def decode_after(self, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
        """The text that `ids` add after `prompt_ids`: a text prompt's continuation. It is the
        whole text less the prompt's, so its first space is the text's or the tokenizer's as
        decoding the whole says; where the continuation makes the prompt's last spaces those
        before a line's first word (a prompt ending in indentation), the continuation alone."""
        head, whole = self.decode(prompt_ids), self.decode([*prompt_ids, *ids])
        return whole[len(head) :] if whole.startswith(head) else self.decode(ids, line_start=False)

    @functools.cached_property
    def _text_bytes_V(self) -> tuple[np.ndarray, ...]:
        """Each piece's UTF-8 bytes ("▁" a space, a byte piece one, `<nl>` a newline, the other
        symbols none); whether it starts with "▁"; whether it is only "▁"s; and whether its
        first other character is an ASCII letter (a byte piece: its byte)."""
        bytes_V = np.zeros(self.vocab_size, np.int64)
        spaced_V, blank_V, word_V = (np.zeros(self.vocab_size, bool) for _ in range(3))
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                bytes_V[i], word_V[i] = 1, chr(int(piece[1:-1], 16)) in string.ascii_letters
            elif i == self.nl_id:
                bytes_V[i] = 1
            elif i not in SPECIAL_IDS.values():
                bytes_V[i] = len(piece.replace("▁", " ").encode())
                spaced_V[i], blank_V[i] = piece[0] == "▁", is_space_run(piece)
                word_V[i] = (piece.lstrip("▁") or " ")[0] in string.ascii_letters
        return bytes_V, spaced_V, blank_V, word_V

    def text_bytes(self, tokens_BT: np.ndarray, loss_mask_BT: np.ndarray) -> np.ndarray:
        """UTF-8 bytes of the text each token spells, for bits per byte; symbols spell none.

        The space that encode adds is not counted. A model trained before 2026-12-06 puts one
        before every text (the dummy prefix): on a piece right after `<bos>` (a document's
        first) or the first trained token after untrained ones (a chat reply's first). A model
        trained since puts one before an ASCII letter that starts a line (`WORD_SPACE`): on the
        line's first piece, right after `<bos>`, `<nl>` or `<sep>`. A document's tokens then
        sum to its normalized text's bytes, a chat's trained ones to its replies'. Exact per
        token, so a row may cut a document anywhere, except in two rare cases, each one byte
        too many: a line whose leading spaces are pieces of their own up to the row's end, and
        a letter after "<nl>" or "<sep>" typed in a chat message (spelled in bytes).
        """
        bytes_V, spaced_V, blank_V, word_V = self._text_bytes_V
        before_BT = np.pad(tokens_BT[:, :-1], ((0, 0), (1, 0)), constant_values=self.pad_id)
        if self._word_space:
            starts_BT = np.isin(before_BT, (self.bos_id, self.nl_id, self.sep_id))
            added_BT = starts_BT & spaced_V[tokens_BT] & word_V[tokens_BT]
            # a line that starts with pieces of spaces only: the first other piece tells
            for b, t in zip(*np.nonzero(starts_BT & blank_V[tokens_BT]), strict=True):
                rest_T = tokens_BT[b, t:]
                first = int(np.argmin(blank_V[rest_T]))
                added_BT[b, t] = not blank_V[rest_T[first]] and word_V[rest_T[first]]
            return bytes_V[tokens_BT] - added_BT
        trained_before_BT = np.pad(loss_mask_BT[:, :-1], ((0, 0), (1, 0)), constant_values=1)
        starts_BT = (before_BT == self.bos_id) | ((trained_before_BT == 0) & (loss_mask_BT != 0))
        return bytes_V[tokens_BT] - (starts_BT & spaced_V[tokens_BT] & self._dummy_prefix)

    def encode_document(self, text: str) -> list[int]:
        """`<bos>` + text + `<eos>`: the unit that the data pipeline packs."""
        return [self.bos_id, *self.encode(text), self.eos_id]

    def encode_chat(
        self, messages: Sequence[dict], *, drop_think: bool = False
    ) -> tuple[list[int], list[int]]:
        """Chat template: per turn `<sep>` role `<nl>` content, then `<eos>`.

        Returns ids and the loss mask: 1 on an assistant reply and on the token that ends it (the
        next turn's `<sep>` or the final `<eos>`), so the model learns to stop. Training keeps
        `<think>` blocks verbatim; `drop_think` removes them from the replies before the last
        user turn (the history a new reply follows), as `generate --chat` does.
        """
        ids, mask = [self.bos_id], [0]
        previous = None
        roles = [m.get("role") for m in messages]
        history = len(roles) - roles[::-1].index("user") - 1 if "user" in roles else 0
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(
                    f"chat message {i} must have role in {ROLES} and string content, got "
                    f"{ {k: type(v).__name__ for k, v in message.items()} }"
                )
            if drop_think and role == "assistant" and i < history:
                content = drop_thinking(content)
            header = [self.sep_id, *self.encode(role), self.nl_id]
            body = self.encode_literal(content)
            ids += header + body
            mask += [int(previous == "assistant")] + [0] * (len(header) - 1)
            mask += [int(role == "assistant")] * len(body)
            previous = role
        ids.append(self.eos_id)
        mask.append(int(previous == "assistant"))
        return ids, mask
