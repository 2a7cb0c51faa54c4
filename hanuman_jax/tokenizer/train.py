"""Training the Unigram model: stream the corpus, sample lines, split long documents, train."""

from __future__ import annotations

import functools
import io
import math
import os
import random
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm
import tqdm
from sentencepiece import sentencepiece_model_pb2

from hanuman_jax.data import DataError, iter_records, resolve_paths
from hanuman_jax.data.schemas import row_to_document
from hanuman_jax.tokenizer import prune
from hanuman_jax.tokenizer.core import (
    ARABIC_DIGITS,
    BOS,
    EOS,
    PAD,
    SPACE,
    THAI_DIGITS,
    UNK,
    USER_SYMBOLS,
    WORD_SPACE,
    is_space_run,
    normalization_rules,
    normalize,
    rules_tsv,
    with_word_spaces,
)

SENTENCEPIECE_MAX_BYTES = 4192  # SentencePiece skips training sentences longer than this
MAX_PIECE_BYTES = 4000  # so documents are split into pieces of at most this many bytes
SCORE_QUANTUM = 1 / 64  # piece scores are rounded to this grid: see quantize_scores
# Longest piece, SentencePiece's default: 24 gave 1.9 % more characters per token on held-out
# Thai of the sources it was trained on, but 0.9-1.4 % fewer on Thai of another source or
# register (pieces of 17-24 characters are phrases of the training text; BENCHMARKS.md,
# "Tokenizer").
MAX_PIECE_CHARS = 16
# Subtracted from every piece's log-probability after training: Viterbi then prefers fewer,
# longer pieces where the likelihoods are close (a prior on the number of tokens). Every text
# of the tokenizer benchmark gets 0-0.6 % more characters per token; 16 or 64 gained no more.
LENGTH_PENALTY = 4.0
NUM_SUB_ITERATIONS = 1  # EM steps between prunings (see _trainer_options)
# SentencePiece trains PRUNE_POOL times the pieces asked for (or all the corpus supports, if
# fewer), and prune.prune_pieces keeps those that save most tokens, in PRUNE_ROUNDS rounds, in
# place of SentencePiece's final choice by probability. On the tokenizer benchmark every 32k
# measure gains 0.2-3.3 points, most on sources left out of training, and 96k ones up to 1.5
# (one gives back 0.1; BENCHMARKS.md, "Tokenizer"). 1.0: SentencePiece's own choice.
PRUNE_POOL = 1.4
PRUNE_ROUNDS = 3
# Runs of 2 to SPACE_RUNS spaces (at most MAX_PIECE_CHARS) are pieces, each as likely as one
# space and never pruned, so an indented line (code, a licence, a table) pays one token for its
# indentation rather than one per space, and the word after it usually keeps its "▁word" piece.
# Plain SentencePiece deletes such runs and cannot give them back; ours keeps them. Four
# English licences in 32k tokenizers: 0.7-4.7 % fewer tokens, two Python modules 5.7-7.8 %; the
# benchmark's texts move by 0.02 points at most, news left out gains 0.07 (BENCHMARKS.md,
# "Tokenizer"). 1: only the runs SentencePiece learned, pruned as any other piece.
SPACE_RUNS = 16
BALANCE = 0.7  # a source's share of the sample ~ its characters ** BALANCE (see sample_sentences)
DIGITS = ARABIC_DIGITS + THAI_DIGITS
# Always pieces, whether or not the corpus holds them, so that each costs one token rather than
# its 3-4 UTF-8 bytes: the single-code-point emoji of Unicode's "Smileys & Emotion" group and the
# hand gestures of "People & Body" (Emoji 17.0), the five skin tones, ZWJ and VS16. A chat or
# social-media model meets them whatever text its tokenizer saw (BENCHMARKS.md, "Tokenizer").
# Only from EMOJI_MIN_VOCAB pieces: in a small vocabulary their 210 pieces cost more than they
# save (on the bundled sample, 11 % fewer characters per token at 1,000 pieces, 3.5 % at 2,000).
EMOJI_MIN_VOCAB = 8000
REQUIRED_EMOJI = (
    "😀😃😄😁😆😅🤣😂🙂🙃🫠😉😊😇🥰😍🤩😘😗☺😚😙🥲😋😛😜🤪😝🤑🤗🤭🫢🫣🤫🤔🫡🤐🤨😐😑"
    "😶🫥😏😒🙄😬🤥🫨😌😔😪🤤😴🫩😷🤒🤕🤢🤮🤧🥵🥶🥴😵🤯🤠🥳🥸😎🤓🧐😕🫤😟🙁☹😮😯😲😳"
    "🫪🥺🥹😦😧😨😰😥😢😭😱😖😣😞😓😩😫🥱😤😡😠🤬😈👿💀☠💩🤡👹👺👻👽👾🤖😺😸😹😻😼😽"
    "🙀😿😾🙈🙉🙊💌💘💝💖💗💓💞💕💟❣💔❤🩷🧡💛💚💙🩵💜🤎🖤🩶🤍💋💯💢🫯💥💫💦💨🕳💬🗨"
    "🗯💭💤👋🤚🖐✋🖖🫱🫲🫳🫴🫷🫸👌🤌🤏✌🤞🫰🤟🤘🤙👈👉👆🖕👇☝🫵👍👎✊👊🤛🤜👏🙌🫶👐"
    "🤲🤝🙏"
    "\U0001f3fb\U0001f3fc\U0001f3fd\U0001f3fe\U0001f3ff\u200d\ufe0f"
)
# Sentence ends: after . ! ? 。, a run of 2+ spaces, or a space between Thai letters (Thai writes
# no full stops). The captured whitespace starts the next sentence, as the "▁" before a word.
_SENTENCE_END = re.compile(
    r"((?<=[.!?。])\s+|(?<=\S)\s{2,}|(?<=[\u0E00-\u0E7F])\s(?=[\u0E00-\u0E7F]))"
)


def row_texts(row, where: str, field: str | None = None) -> list[str]:
    """The strings a JSONL row contributes to the tokenizer corpus (schemas.py, or --field)."""
    if field is None:
        doc = row_to_document(row, where)
        return [] if doc is None else [t for t in doc.texts() if t]
    if not isinstance(row, dict) or field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: no --field {field!r} here; keys: {keys}")
    return [row[field]] if isinstance(row[field], str) and row[field] else []


def iter_documents(inputs: Iterable[str], field: str | None = None) -> Iterator[str]:
    """Every document of every input file (plain text: a line; JSONL: a row's strings)."""
    paths = [p for pattern in inputs for p in resolve_paths(pattern) if p.is_file()]
    if not paths:
        raise DataError(f"--input {' '.join(inputs)}: no readable files")
    with tqdm.tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
                   desc="reading", disable=None) as bar:  # fmt: skip
        for path in paths:
            for where, value in iter_records(path, bar.update):
                if path.suffix == ".jsonl":
                    yield from row_texts(value, where, field)
                else:
                    yield value


def split_document(text: str, max_bytes: int = MAX_PIECE_BYTES) -> list[str]:
    """Lines, then sentences, then hard cuts, so that every piece fits SentencePiece's limit."""
    pieces = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if len(line.encode("utf-8")) <= max_bytes:
            pieces.append(line)
            continue
        parts = _SENTENCE_END.split(line)  # text, separator, text, ...
        sentences = parts[:1] + ["".join(parts[i : i + 2]) for i in range(1, len(parts), 2)]
        current = ""
        for sentence in sentences:
            candidate = current + sentence
            if len(candidate.encode("utf-8")) <= max_bytes:
                current = candidate
                continue
            if current:
                pieces.append(current)
            while len(sentence.encode("utf-8")) > max_bytes:
                cut = len(sentence.encode("utf-8")[:max_bytes].decode("utf-8", "ignore"))
                pieces.append(sentence[:cut])
                sentence = sentence[cut:]
            current = sentence
        if current:
            pieces.append(current)
    return pieces


def _reservoir(documents: Iterable[str], size: int, rng: random.Random) -> tuple[list[str], int]:
    """A uniform sample of at most `size` pieces in bounded memory, and the characters seen."""
    sample: list[str] = []
    seen = chars = 0
    for doc in documents:
        for piece in split_document(doc):
            seen += 1
            chars += len(piece)
            if len(sample) < size:
                sample.append(piece)
            else:
                j = rng.randrange(seen)
                if j < size:
                    sample[j] = piece
    return sample, chars


def sample_sentences(
    sources: Sequence[Iterable[str]],
    max_sentences: int,
    *,
    balance: float = BALANCE,
    seed: int = 0,
) -> list[str]:
    """At most `max_sentences` pieces drawn from several sources (each a stream of documents).

    Each source is sampled uniformly in bounded memory. A source's share of the sample's
    characters is proportional to its characters ** `balance`, the temperature sampling XLM-R and
    mT5 use for languages: 1.0 keeps the corpus's proportions, lower values raise the share of the
    smaller sources. Their pieces are repeated (stochastically rounded) rather than any being left
    out, unless the total would pass `max_sentences`. On ../shared/data's three sources, of very
    unequal sizes, 0.7 gives the best worst case against plain SentencePiece over text of the
    sources and of sources and registers left out of training (BENCHMARKS.md, "Tokenizer"):
    0.5 favours the small sources' own text, 1.0 the largest's.
    """
    rng = random.Random(seed)
    drawn = [_reservoir(docs, max_sentences, rng) for docs in sources]
    drawn = [(sample, chars) for sample, chars in drawn if sample]
    if not drawn:
        return []
    # weight of one sampled character of each source, so the least favoured appears once
    weight = [chars**balance / sum(map(len, sample)) for sample, chars in drawn]
    repeats = [w / min(weight) for w in weight]
    total = sum(r * len(sample) for r, (sample, _) in zip(repeats, drawn, strict=True))
    repeats = [r * min(1.0, max_sentences / total) for r in repeats]
    out = []
    for r, (sample, _) in zip(repeats, drawn, strict=True):
        whole, frac = int(r), r - int(r)
        for piece in sample:
            out.extend([piece] * (whole + (rng.random() < frac)))
    return out


def train_tokenizer(
    sources: Sequence[Iterable[str]],
    model_prefix: str | Path,
    vocab_size: int,
    *,
    thai_digits: str = "keep",
    character_coverage: float = 0.99995,
    max_sentences: int = 2_000_000,
    balance: float = BALANCE,
    max_piece_chars: int = MAX_PIECE_CHARS,
    length_penalty: float = LENGTH_PENALTY,
    word_space: bool = True,
    prune_pool: float = PRUNE_POOL,
    space_runs: int = SPACE_RUNS,
    seed: int = 0,
    options: Mapping[str, object] | None = None,
) -> Path:
    """Trains the Unigram model with byte fallback and the project's symbols and normalization
    on a sample of `sources` (streams of documents; see sample_sentences); writes PREFIX.model
    and PREFIX.vocab and returns the .model path. `word_space`: a space before an ASCII letter
    that starts a line (see `core.WORD_SPACE`), in the training text and marked in the model.
    `prune_pool`: SentencePiece trains up to this many times `vocab_size` pieces, and those that
    save the sample most tokens are kept (prune.py); where the corpus supports fewer than
    `vocab_size` (the runs of spaces counted in), SentencePiece is trained at `vocab_size`
    itself, and fails naming the size it supports. `space_runs`: the longest run of spaces that
    is a piece (with_space_runs). `options`: SentencePiece trainer options that replace ours
    (scripts/bench_tokenizer.py measures each of our choices with them)."""
    if word_space and (options or {}).get("add_dummy_prefix"):
        raise ValueError("word_space and add_dummy_prefix both put a space before a text: pick one")
    if prune_pool < 1:
        raise ValueError(f"prune_pool {prune_pool} is below 1: the pool holds the vocabulary")
    if space_runs < 1:
        raise ValueError(f"space_runs {space_runs} is below 1: 1 adds no runs of spaces")
    path = Path(f"{model_prefix}.model")
    try:  # fail before reading a large corpus, not after training on it
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".write_test").write_bytes(b"")
        path.with_suffix(".write_test").unlink()
    except OSError as e:
        raise DataError(
            f"--model-prefix {model_prefix}: cannot write there ({e.strerror})"
        ) from None
    if word_space:
        # on NFC text, as Tokenizer.encode puts them ("A" + U+0301 is "Á", no ASCII letter)
        nfc = functools.partial(unicodedata.normalize, "NFC")
        sources = [map(with_word_spaces, map(nfc, docs)) for docs in sources]
    sample = sample_sentences(sources, max_sentences, balance=balance, seed=seed)
    if not sample:
        raise DataError("the tokenizer corpus is empty: give --input files with some text")
    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / "rules.tsv"
        tsv.write_text(rules_tsv(normalization_rules(thai_digits)), encoding="utf-8")
        trainer = _trainer_options(vocab_size, thai_digits, character_coverage,
                                   max_piece_chars, tsv)  # fmt: skip
        trainer |= dict(options or {})
        longest = min(space_runs, max_piece_chars)
        model = None
        if prune_pool > 1:  # as many pieces as the corpus supports, up to the pool's size
            pool = {"vocab_size": math.ceil(vocab_size * prune_pool), "hard_vocab_limit": False}
            pooled = _sentencepiece(sample, trainer | pool, vocab_size)
            pooled = with_space_runs(quantize_scores(pooled, length_penalty), longest)
            model = _pruned(pooled, sample, vocab_size, keep_runs=longest)
        if model is None:  # SentencePiece's own choice, or its error naming the size it supports
            model = quantize_scores(_sentencepiece(sample, trainer, vocab_size), length_penalty)
            model = with_space_runs(model, longest, make_room=True)
    model = without_machine_details(model)
    path.write_bytes(_with_word_space(model) if word_space else model)
    _write_vocab(path)
    return path


def _sentencepiece(sample: Sequence[str], trainer: Mapping[str, object], asked: int) -> bytes:
    """The model SentencePiece trains on `sample` with `trainer`'s options (errors name the
    `asked` vocabulary size, --vocab-size)."""
    written = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=written, **trainer
        )
    except RuntimeError as e:
        raise DataError(_explain(str(e), asked)) from None
    return written.getvalue()


def _pruned(pool: bytes, sample: Sequence[str], vocab_size: int, keep_runs: int) -> bytes | None:
    """The pool of pieces cut to `vocab_size` (prune.prune_pieces); None where it holds fewer
    pieces than that, or more that must be kept (single characters, bytes, symbols, runs of
    spaces up to `keep_runs` long)."""
    pieces = sentencepiece_model_pb2.ModelProto.FromString(pool).pieces
    kept = sum(not prune.droppable(piece, keep_runs) for piece in pieces)
    if len(pieces) < vocab_size or kept > vocab_size:
        return None
    return prune.prune_pieces(pool, sample, vocab_size, PRUNE_ROUNDS, keep_runs)


def _trainer_options(
    vocab_size: int, thai_digits: str, character_coverage: float, max_piece_chars: int, rules: Path
) -> dict[str, object]:
    """SentencePiece's trainer options: ours, where they differ from its defaults, and the ids."""
    required = ARABIC_DIGITS + (THAI_DIGITS if thai_digits == "keep" else "")
    required += REQUIRED_EMOJI if vocab_size >= EMOJI_MIN_VOCAB else ""
    return {
        "model_type": "unigram",
        "vocab_size": vocab_size,
        "byte_fallback": True,
        "character_coverage": character_coverage,
        "normalization_rule_tsv": str(rules),
        "remove_extra_whitespaces": False,
        # No space before every text: Thai would pay for it, and short texts (titles, chat
        # turns) save the token the space cost (BENCHMARKS.md, "Tokenizer": Thai Wikipedia
        # titles +9 %). An ASCII word that starts a line gets one instead (word_space).
        "add_dummy_prefix": False,
        "required_chars": required,
        "allow_whitespace_only_pieces": True,
        "max_sentencepiece_length": max_piece_chars,
        # One EM step between prunings rather than SentencePiece's two: over three samples of
        # ../shared/data, 5 of the benchmark's 20 measures behind plain SentencePiece instead
        # of 7, most of all on the sources left out of training; 96k English loses 0.1 %
        # (BENCHMARKS.md, "Tokenizer"). Training is faster too.
        "num_sub_iterations": NUM_SUB_ITERATIONS,
        "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3,
        "unk_piece": UNK, "bos_piece": BOS, "eos_piece": EOS, "pad_piece": PAD,
        "user_defined_symbols": list(USER_SYMBOLS),
        "max_sentence_length": SENTENCEPIECE_MAX_BYTES,
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
        "num_threads": os.cpu_count() or 1,
        "minloglevel": 2,
    }  # fmt: skip


def without_machine_details(model: bytes) -> bytes:
    """Drops what SentencePiece records of the machine that trained the model: the temporary
    path of the normalization rules and the thread count. Neither is read when encoding, and
    without them the same files give the same bytes, so a retrained tokenizer passes a resume's
    check (a checkpoint records the tokenizer file's sha256)."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    proto.normalizer_spec.ClearField("normalization_rule_tsv")
    proto.trainer_spec.ClearField("num_threads")
    return proto.SerializeToString()


def _with_word_space(model: bytes) -> bytes:
    """Marks the model as one whose lines' first ASCII words get a space (`core.WORD_SPACE`):
    `Tokenizer` and the Hugging Face export read the mark; SentencePiece ignores the name."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    proto.normalizer_spec.name = WORD_SPACE
    return proto.SerializeToString()


def quantize_scores(model: bytes, length_penalty: float = 0.0) -> bytes:
    """Rounds piece scores to multiples of SCORE_QUANTUM, less `length_penalty` (a multiple of
    it, so that they stay on the grid: see LENGTH_PENALTY).

    SentencePiece sums scores in float32, Hugging Face's Unigram in float64. On a 1/64 grid both
    sums are exact for any text scoring above -2^17 nats (about 8,000 tokens at the 16.5 nats a
    token of held-out shared data with LENGTH_PENALTY; 15,000 without), so equal segmentations
    tie exactly in both and the two pick the same one: the exported tokenizer's ids equal ours
    (0 of 69,287 shared-data lines differ, against 41 unrounded; a 12,395-token news article
    needed the 1/64 grid rather than 1/256, and still gives the same ids with the penalty).
    Rounding moves a score by at most 1/128.
    """
    if length_penalty % SCORE_QUANTUM:
        raise ValueError(f"length_penalty {length_penalty} is not a multiple of {SCORE_QUANTUM}")
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    for piece in proto.pieces:
        if piece.type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL:
            piece.score = round(piece.score / SCORE_QUANTUM) * SCORE_QUANTUM - length_penalty
    return proto.SerializeToString()


def with_space_runs(model: bytes, longest: int, make_room: bool = False) -> bytes:
    """`model` with a piece for every run of 2 to `longest` spaces, each scored as the single
    space is (a run it learned keeps its own score where that is higher; see SPACE_RUNS); as it
    is where `longest` is below 2. `make_room`: as many learned pieces go as runs are added, the
    least likely first (among equal scores the later, as SentencePiece lists them), and no more
    runs are added than there are such pieces."""
    if longest < 2:
        return model
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    learned = [p for p in proto.pieces if p.type == p.NORMAL]
    one = next((p.score for p in learned if p.piece == SPACE), None)
    if one is None:  # a corpus without a space has no "▁" piece (a space is then a byte)
        one = min(p.score for p in learned)
    for piece in learned:
        if is_space_run(piece.piece) and 1 < len(piece.piece) <= longest:
            piece.score = max(piece.score, one)
    have = {p.piece for p in proto.pieces}
    added = [SPACE * n for n in range(2, longest + 1) if SPACE * n not in have]
    if make_room:
        room = [(p.score, -i) for i, p in enumerate(proto.pieces) if prune.droppable(p, longest)]
        added = added[: len(room)]
        prune.without(proto, {-i for _, i in sorted(room)[: len(added)]})
    for run in added:
        proto.pieces.add(piece=run, score=one)
    return proto.SerializeToString()


def _explain(message: str, vocab_size: int) -> str:
    found = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)",
                      message)  # fmt: skip
    if found:
        return (
            f"--vocab-size {vocab_size} is too large for this corpus: it supports at most "
            f"{found.group(2)} pieces; lower --vocab-size or add text"
        )
    found = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if found:
        return (
            f"--vocab-size {vocab_size} is too small: the special, byte, digit and required "
            f"pieces alone need {found.group(2)}"
        )
    return f"SentencePiece could not train: {message.strip().splitlines()[-1]}"


def _write_vocab(model_path: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    lines = (f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    model_path.with_suffix(".vocab").write_text("".join(lines), encoding="utf-8")


def corpus_texts(inputs: Iterable[str], field: str | None, thai_digits: str) -> Iterator[str]:
    """Documents, normalized as at encode time (SentencePiece would do it too; doing it first
    keeps sentence splitting and sampling on the text the model really sees)."""
    for doc in iter_documents(inputs, field):
        yield normalize(doc, thai_digits)


def corpus_sources(
    inputs: Sequence[str], field: str | None, thai_digits: str
) -> list[Iterator[str]]:
    """One stream of normalized documents per --input (a file or a glob): the sources that
    sample_sentences balances. Every input is resolved first, so a typo fails before reading."""
    for pattern in inputs:
        resolve_paths(pattern)
    return [corpus_texts([pattern], field, thai_digits) for pattern in inputs]
