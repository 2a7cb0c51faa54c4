"""The final choice of pieces: from SentencePiece's larger pool, keep those that save most tokens.

SentencePiece's Unigram trainer ends by keeping the pieces of highest probability. Among pieces
that the training text uses about equally rarely, probability says little about what a piece is
worth: it is the tokens a text needs without it that count. `prune_pieces` instead drops, in a
few rounds, the pieces whose removal costs the training sample fewest tokens:

- each round segments the sample with the current pieces (Viterbi, as `encode` does) and counts
  how often each piece is used;
- a piece's worth is its count times the tokens it saves over the best segmentation of its text
  without it (SentencePiece's second best, as its own pruning takes the alternative);
- the least worth go first; among equals, longer pieces before shorter (a long piece used as
  rarely as a short one is less likely to recur in new text), then lower scores;
- among pieces worth at most one token (unused, or used once and saving one: where the cut
  falls when a corpus supports few more pieces than asked for), length is counted in UTF-8
  bytes rather than characters, so a Thai piece (three bytes a character) goes before a Latin
  one of fewer than three times its characters. On the benchmark's 96k tokenizers, English of
  the UDHR goes from 0.20-0.28 % behind plain SentencePiece to 0.16-0.32 % ahead (three
  samples), English licences and code outside the benchmark take 0.1-0.5 % fewer tokens, and
  no Thai measure gives back more than 0.15 points; at 32k only news left out moves, by 0.02
  points at most (BENCHMARKS.md, "Tokenizer"). Counted in bytes at every worth, 32k measures
  gave back up to 1.1 points (throwaway runs).

Single characters, byte pieces, the special and user-defined symbols and runs of up to
`keep_runs` spaces (train.SPACE_RUNS) are always kept. The kept pieces keep their scores:
re-estimated from the last round's counts, they moved no measure of the tokenizer benchmark by
more than 0.02 %. Ties are broken by piece id, so the result is deterministic (and, like
encoding, the same on any number of cores).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from hanuman_jax.tokenizer.core import SPACE, is_space_run

_NORMAL = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
_BATCH = 2_000  # sentences encoded at once: at most ~8 MB of text, a few million ids


def droppable(piece: sentencepiece_model_pb2.ModelProto.SentencePiece, keep_runs: int) -> bool:
    """Whether `prune_pieces` may drop the piece: a learned piece of two or more characters,
    not a run of up to `keep_runs` spaces (train.SPACE_RUNS)."""
    learned = piece.type == _NORMAL and len(piece.piece) > 1
    return learned and not (is_space_run(piece.piece) and len(piece.piece) <= keep_runs)


def piece_counts(sp: spm.SentencePieceProcessor, sample: Sequence[str]) -> np.ndarray:
    """How many times each piece id is used when `sample`'s sentences are encoded."""
    counts = np.zeros(sp.get_piece_size(), np.int64)
    threads = os.cpu_count() or 1
    for start in range(0, len(sample), _BATCH):
        ids = sp.encode(list(sample[start : start + _BATCH]), num_threads=threads)
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, sum(map(len, ids)))
        counts += np.bincount(flat, minlength=len(counts))
    return counts


def tokens_saved(
    model: bytes, sample: Sequence[str], keep_runs: int = 0
) -> list[tuple[int, int, float, int]]:
    """For each piece that may be dropped (`droppable`), in order of who goes first: (tokens it
    saves the sample, minus its length (in bytes where it saves at most one token), its score,
    its id)."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    counts = piece_counts(spm.SentencePieceProcessor(model_proto=model), sample)
    bare = _without_normalizer(proto)  # segments a piece's own symbols, nothing added or folded
    worth = []
    for i, piece in enumerate(proto.pieces):
        if not droppable(piece, keep_runs):
            continue
        text = piece.piece.replace(SPACE, " ")
        alternatives = [ids for ids in bare.nbest_encode(text, nbest_size=2) if ids != [i]]
        if alternatives:  # none: the piece is its text's only segmentation; keep it
            saved = int(counts[i]) * (len(alternatives[0]) - 1)
            size = len(text.encode("utf-8")) if saved <= 1 else len(piece.piece)
            worth.append((saved, -size, piece.score, i))
    return sorted(worth)


def without(proto: sentencepiece_model_pb2.ModelProto, drop: set[int]) -> None:
    """Removes the pieces whose ids are in `drop` from `proto` (the others' ids close up)."""
    kept = [piece for i, piece in enumerate(proto.pieces) if i not in drop]
    del proto.pieces[:]
    proto.pieces.extend(kept)


def _without_normalizer(
    proto: sentencepiece_model_pb2.ModelProto,
) -> spm.SentencePieceProcessor:
    """The model's pieces with no normalization: no dummy prefix, no folding, every space kept."""
    bare = sentencepiece_model_pb2.ModelProto()
    bare.CopyFrom(proto)
    bare.normalizer_spec.Clear()
    bare.normalizer_spec.name = "identity"
    bare.normalizer_spec.add_dummy_prefix = False
    bare.normalizer_spec.remove_extra_whitespaces = False
    bare.ClearField("denormalizer_spec")
    return spm.SentencePieceProcessor(model_proto=bare.SerializeToString())


def prune_pieces(
    model: bytes, sample: Sequence[str], vocab_size: int, rounds: int, keep_runs: int = 0
) -> bytes:
    """`model` with `vocab_size` pieces: the others dropped over `rounds` rounds, those saving
    `sample` fewest tokens first (see the module's docstring); runs of up to `keep_runs` spaces
    are kept."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    start = len(proto.pieces)
    if start < vocab_size:
        raise ValueError(f"the model has {start} pieces, fewer than the {vocab_size} asked for")
    for r in range(1, rounds + 1):
        target = round(start - (start - vocab_size) * r / rounds)
        excess = len(proto.pieces) - target
        if excess <= 0:
            continue
        worth = tokens_saved(proto.SerializeToString(), sample, keep_runs)
        if len(worth) < excess:
            raise ValueError(f"only {len(worth)} pieces may be dropped, {excess} must be")
        without(proto, {i for *_, i in worth[:excess]})
    proto.trainer_spec.vocab_size = len(proto.pieces)
    proto.trainer_spec.ClearField("hard_vocab_limit")  # the pool's; the file has the size asked
    return proto.SerializeToString()
