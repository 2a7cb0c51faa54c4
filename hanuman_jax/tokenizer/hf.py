"""Export to Hugging Face: a `tokenizer.json` that replays our SentencePiece model.

The format is a plain `PreTrainedTokenizerFast`. transformers 5 always loads the Rust backend (it
ignores `use_fast=False`), and its `LlamaTokenizer` rebuilds a BPE model from the vocabulary,
which would wreck a Unigram model; `PreTrainedTokenizerFast` loads `tokenizer.json` verbatim in
transformers 4.x and 5.x. The pipeline mirrors SentencePiece step by step:

- normalizer: NFC (as `Tokenizer.encode`), then the rules of the model's own `precompiled_charsmap`
  that NFC does not imply (quotes, dashes, newlines -> `<nl>`, runs of spaces holding a no-break
  space, ...), then spaces -> `▁`; then, for a model trained since 2026-12-06, a `▁` before an
  ASCII letter that starts a line (`core.WORD_SPACE`), or for an older one the dummy-prefix `▁`
  once at the start;
- model: Unigram with SentencePiece's scores, user symbols at the score SentencePiece gives them
  in its lattice, and the byte fallback;
- decoder: SentencePiece's decode, then `<nl>` -> newline and the line-start spaces taken
  away, as `Tokenizer.decode`.

`<sep>` is also a special added token, and `tokenizer_config.json` carries `chat_template`, which
gives `apply_chat_template` the ids of `Tokenizer.encode_chat` (see `chat_template`). So that the
template's `<bos>` and `<eos>` are tokens, these names typed in a text are the tokens too (as in
every Hugging Face tokenizer), where SentencePiece spells them in letters; a text holding a typed
`<sep>` may get a `▁` after it, as the text after an added token starts anew (the dummy prefix,
or the space before a line's first ASCII word). In a model with that space, `<nl>` is an added
token too (see `build_tokenizer`); so is a typed `<nl>` or `<sep>` right before U+0338, which
`Tokenizer` first joins to the ">" by NFC ("≯").

SentencePiece keeps its Viterbi scores in float32 and the Rust Unigram in float64: where two
segmentations score the same (a run of one repeated letter: `-----|---` vs `---|-----`), float32
rounding makes SentencePiece pick one and the Rust code the other. Our training rounds piece
scores to a 1/64 grid (`train.quantize_scores`) so that both sums are exact and the choices agree;
a model with unrounded scores (trained elsewhere) still differs on about 1 line in 1000.
`tokenizer.model` is copied too, for exact SentencePiece use.
"""

from __future__ import annotations

import json
import re
import shutil
import string
import struct
import unicodedata
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2

try:
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import Unigram
except ImportError as e:
    raise ImportError(
        f"the Hugging Face export needs `tokenizers` ({e}), a dependency of hanuman-jax: "
        "pip install -c constraints.txt -e . (or pip install hanuman-jax)"
    ) from None

from hanuman_jax.tokenizer import core
from hanuman_jax.tokenizer.core import BOS, EOS, NEWLINE, PAD, SEP, UNK, Tokenizer

_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
_LATTICE = (_Piece.NORMAL, _Piece.USER_DEFINED)  # the piece types SentencePiece matches in text
_FLT_MIN = struct.unpack("<f", struct.pack("<I", 0x00800000))[0]


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def charsmap_rules(charsmap: bytes) -> dict[str, str]:
    """Source -> replacement of every rule in a SentencePiece `precompiled_charsmap`."""
    if not charsmap:
        return {}
    # Layout: uint32 trie size, a darts-clone double array of uint32 units, then the
    # NUL-terminated replacements that the leaves point into.
    (size,) = struct.unpack_from("<I", charsmap)
    units = struct.unpack_from(f"<{size // 4}I", charsmap, 4)
    replacements = charsmap[4 + size :]

    def offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    rules, stack = {}, [(b"", offset(units[0]))]
    while stack:
        key, node = stack.pop()
        for byte in range(1, 256):
            child = node ^ byte
            if child >= len(units) or units[child] & ((1 << 31) | 0xFF) != byte:
                continue
            nxt = child ^ offset(units[child])
            if units[child] >> 8 & 1:
                start = units[nxt] & ((1 << 31) - 1)
                end = replacements.index(b"\0", start)
                rules[(key + bytes([byte])).decode()] = replacements[start:end].decode()
            stack.append((key + bytes([byte]), nxt))
    return rules


def _check_ours(proto, path: Path) -> None:
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    expected = {
        "model_type": (spec.model_type, spec.UNIGRAM),
        "byte_fallback": (spec.byte_fallback, True),
        "remove_extra_whitespaces": (norm.remove_extra_whitespaces, False),
        "escape_whitespaces": (norm.escape_whitespaces, True),
        "treat_whitespace_as_suffix": (spec.treat_whitespace_as_suffix, False),
        "denormalizer rules": (bool(proto.denormalizer_spec.precompiled_charsmap), False),
    }
    wrong = {k: got for k, (got, want) in expected.items() if got != want}
    if wrong:
        raise ValueError(
            f"tokenizer model {path} was not trained by `python -m hanuman_jax.tokenizer train` "
            f"(got {wrong}); only those models can be exported"
        )


def _normalizer(proto, users: list[str]) -> normalizers.Normalizer:
    rules = charsmap_rules(proto.normalizer_spec.precompiled_charsmap)
    # The compositions in the table are NFC's; the Rust Precompiled normalizer would replay them
    # too, but it replaces whole graphemes (e.g. "—" + U+0301 loses the accent), so the other
    # rules go in as plain replacements. SentencePiece leaves a user symbol unnormalized.
    extra = {
        src: dst
        for src, dst in rules.items()
        if unicodedata.normalize("NFC", src) != dst and not src.startswith(tuple(users))
    }
    steps = [normalizers.NFC()]
    # The no-break-space runs go first, as one regex that takes the longest run at each position
    # as SentencePiece does; one Replace per rule would rewrite the leftovers of a longer run.
    runs = {src for src in extra if len(src) > 1 and not src.strip(" \u00a0")}
    if runs:
        if runs != set(core.NBSP_RUNS):
            raise ValueError(f"unknown whitespace rules, cannot export: {sorted(runs)[:5]}")
        steps.append(normalizers.Replace(Regex(core.NBSP_RUN_PATTERN), " "))
        extra = {src: dst for src, dst in extra.items() if src not in runs}
    if any(src in dst for src in extra for dst in extra.values()):
        raise ValueError(f"normalization rules feed each other, cannot export: {extra}")
    steps += [normalizers.Replace(s, extra[s]) for s in sorted(extra, key=len, reverse=True)]
    steps.append(normalizers.Replace(" ", "▁"))
    if proto.normalizer_spec.name == core.WORD_SPACE:
        # a ▁ before an ASCII letter that starts a line (after <nl> or <sep>, then at the start)
        # and after any spaces there, as Tokenizer.encode puts it
        word = f"▁*[{core.LATIN}]"
        steps += [
            *(normalizers.Replace(Regex(f"{s}(?={word})"), s + "▁") for s in (NEWLINE, SEP)),
            normalizers.Prepend("▁"),
            normalizers.Replace(Regex(f"\\A▁(?!{word})"), ""),
        ]
    elif proto.normalizer_spec.add_dummy_prefix:  # models trained before 2026-12-06
        steps.append(normalizers.Prepend("▁"))
    return normalizers.Sequence(steps)


def build_tokenizer(proto) -> RustTokenizer:
    """The `tokenizers.Tokenizer` equivalent to a SentencePiece `ModelProto` of ours."""
    pieces = list(proto.pieces)
    normal = [p.score for p in pieces if p.type == _Piece.NORMAL]
    users = [p.piece for p in pieces if p.type == _Piece.USER_DEFINED]
    reserved = [p.piece for p in pieces if p.type not in _LATTICE]
    # unigram_model.cc: a user symbol scores length_in_bytes * max_score - 0.1, with max_score
    # starting at FLT_MIN, so in practice -0.1: it always wins.
    max_score = max([_FLT_MIN, *normal])
    # Control, byte and unused pieces are not in SentencePiece's lattice, but the Rust one matches
    # every vocabulary entry, so they get a score below any spelling of them in single letters.
    floor = min(normal) * (1 + max(len(p) for p in reserved))
    vocab = [
        (p.piece, p.score if p.type == _Piece.NORMAL
         else _f32(len(p.piece.encode()) * max_score) - 0.1 if p.type == _Piece.USER_DEFINED
         else floor)
        for p in pieces
    ]  # fmt: skip
    tok = RustTokenizer(Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=True))
    tok.normalizer = _normalizer(proto, users)

    # A reserved name with a letter the model lacks ("<bos>" where "<" is unknown) would beat the
    # unknown-letter path whatever its score; cutting the text at such letters keeps it out. Each
    # cut is a forced boundary in SentencePiece too: no piece but a user symbol holds the letter,
    # and a user symbol holding one is always chosen, so it goes out whole.
    singles = {p.piece for p in pieces if p.type in _LATTICE and len(p.piece) == 1}
    in_normal = {c for p in pieces if p.type == _Piece.NORMAL for c in p.piece}
    cut = sorted({c for name in reserved for c in name} - singles - in_normal)
    if cut:
        whole = sorted((u for u in users if any(c in u for c in cut)), key=len, reverse=True)
        pattern = "|".join([*map(re.escape, whole), f"[{''.join(map(re.escape, cut))}]"])
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")

    dummy = [decoders.Strip(" ", 1, 0)] if proto.normalizer_spec.add_dummy_prefix else []
    # and the spaces Tokenizer.encode put before a line's first word, after a newline or <sep>
    # (Oniguruma's ^ is the start of any line, as in Ruby)
    words = []
    if proto.normalizer_spec.name == core.WORD_SPACE:
        words = [decoders.Replace(Regex(f"(?:^|(?<={SEP})) (?= *[{core.LATIN}])"), "")]
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *dummy,
        decoders.Replace(NEWLINE, "\n"), *words,
    ])  # fmt: skip
    bos = proto.trainer_spec.bos_id
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos)]
    )
    # <sep> as an added token cuts the text there, so each turn's role and content are normalized
    # apart, as `Tokenizer.encode_chat` encodes them (see `chat_template`).
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in (UNK, BOS, EOS, PAD, SEP)]
    )
    if proto.normalizer_spec.name == core.WORD_SPACE:
        # A typed <nl> (the template's, after a role) cuts the text too: the space before the
        # next line's first word then lines up with the word, not the <nl>, so that a reply's
        # first token is inside {% generation %}. (A model with a dummy prefix would put it
        # after every cut, so its <nl> stays a plain piece.)
        tok.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    return tok


# Each turn is <sep> role <nl> content, the content encoded on its own (so, for a model with a
# dummy prefix, after SentencePiece's space unless it is empty or invisible), and the turn ends at
# the next <sep> or the final <eos>. Text after <sep> gets the tokenizer's own dummy prefix; the
# template writes the content's. {% generation %} marks what `encode_chat`'s loss mask marks: a
# reply and its end.
# A generation prompt drops the <think> blocks of the replies before the last user turn, as
# `generate --chat` does (`drop_thinking`: each block and the whitespace after it).
_CHAT_TEMPLATE = string.Template("""\
{%- set roles, reserved = $roles, $reserved -%}
{%- set last = namespace(user=0) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}{%- set last.user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- '$bos$sep' -}}
{%- for message in messages -%}
    {%- set i, content = loop.index0, message['content'] -%}
    {%- if message['role'] not in roles or content is not string -%}
        {{- raise_exception('chat message ' ~ i ~ ' must have role in ' ~ roles ~ ' and string \
content') -}}
    {%- endif -%}
    {%- if add_generation_prompt and message['role'] == 'assistant' and i < last.user -%}
        {%- set kept = namespace(text='', rest=content) -%}
        {%- for _ in range(content.count('<think>')) -%}
            {%- set head, tag, tail = kept.rest.partition('<think>') -%}
            {%- if tag and '</think>' in tail -%}
                {%- set kept.text = kept.text + head -%}
                {%- set kept.rest = tail.partition('</think>')[2].lstrip() -%}
            {%- endif -%}
        {%- endfor -%}
        {%- set content = kept.text + kept.rest -%}
    {%- endif -%}
    {%- for name in reserved if name in content$visible -%}
        {{- raise_exception('chat message ' ~ i ~ ' holds ' ~ name ~ ', which this template cannot \
encode as Tokenizer.encode_chat does') -}}
    {%- endfor -%}
    {%- if $dummy and content$visible -%}{%- set content = ' ' + content -%}{%- endif -%}
    {%- set end = '$sep' if not loop.last or add_generation_prompt else '$eos' -%}
    {{- message['role'] + '$nl' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}{{- content + end -}}{%- endgeneration -%}
    {%- else -%}
        {{- content + end -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'assistant$nl' -}}{%- endif -%}
""")


def chat_template(dummy_prefix: bool = False) -> str:
    """The Jinja chat template (as transformers renders it) whose ids are `encode_chat`'s, and
    with `add_generation_prompt` the prompt of `generate --chat` (`encode_chat(drop_think=True)`
    and the reply's header).

    A content holding a symbol's name is refused: `encode_chat` spells it in bytes, which no text
    can tokenize to.
    """
    return _CHAT_TEMPLATE.substitute(
        bos=BOS, eos=EOS, sep=SEP, nl=NEWLINE, roles=repr(list(core.ROLES)),
        reserved=repr([UNK, BOS, EOS, PAD, *core.USER_SYMBOLS]),
        visible="".join(f" | replace({c!r}, '')" for c in core.INVISIBLE),
        dummy=str(dummy_prefix).lower(),
    )  # fmt: skip


def export_hf(model_file: str | Path, out_dir: str | Path) -> Path:
    """Writes `tokenizer.json`, its configs and `tokenizer.model` for `AutoTokenizer`."""
    path = Path(model_file)
    Tokenizer(path)  # refuses a model without our fixed special ids
    proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    _check_ours(proto, path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(proto).save(str(out / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        # transformers 4 defaults to True, which deletes spaces before punctuation on decode.
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(proto.normalizer_spec.add_dummy_prefix),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    shutil.copyfile(path, out / "tokenizer.model")
    return out
