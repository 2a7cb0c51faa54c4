"""`python -m hanuman_jax.tokenizer {train, evaluate, export-hf} ...`: the SentencePiece
tokenizer's command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hanuman_jax import cli
from hanuman_jax.data import DataError, iter_records
from hanuman_jax.tokenizer.train import BALANCE, MAX_PIECE_CHARS, PRUNE_POOL

MIN_VOCAB = 320  # 4 control + 7 user symbols + 256 bytes + 20 digits, and some real pieces


def _train(args) -> None:
    from hanuman_jax.tokenizer.train import corpus_sources, train_tokenizer

    start = time.perf_counter()
    sources = corpus_sources(args.input, args.field, args.thai_digits)
    path = train_tokenizer(
        sources,
        args.model_prefix,
        args.vocab_size,
        thai_digits=args.thai_digits,
        character_coverage=args.character_coverage,
        max_sentences=args.max_sentences,
        balance=args.balance,
        max_piece_chars=args.max_piece_chars,
        prune_pool=args.prune_pool,
        seed=args.seed,
    )
    print(f"wrote {path} and {path.with_suffix('.vocab')} "
          f"({args.vocab_size} pieces) in {time.perf_counter() - start:.1f} s")  # fmt: skip


def _evaluate(args) -> None:
    from hanuman_jax.tokenizer.evaluate import format_table, measure, summarize, tokens_per_word
    from hanuman_jax.tokenizer.train import iter_documents

    tokenizer = _load(args.model)
    lines = [x for doc in iter_documents(args.input, args.field) for x in doc.splitlines()]
    lines = [x for x in lines if x.strip()]
    if not lines:
        raise DataError(f"--input {' '.join(args.input)}: no text to evaluate")
    words = [x for _, x in iter_records(Path(args.words))] if args.words else None
    start = time.perf_counter()
    results = measure(tokenizer, lines)
    seconds = time.perf_counter() - start
    print(format_table(results))
    summary = summarize(results)
    if words is not None:
        summary["tokens_per_word"] = tokens_per_word(tokenizer, words)
        print(f"tokens per word ({args.words}): {summary['tokens_per_word']:.3f}")
    summary["seconds"] = seconds
    print(json.dumps(summary))


def _export_hf(args) -> None:
    from hanuman_jax.tokenizer.hf import export_hf

    try:
        out = export_hf(_load(args.model).path, args.out)
    except ValueError as e:  # a model of ours with settings a tokenizer.json cannot replay
        raise DataError(f"--model {args.model}: {e}") from None
    except OSError as e:
        raise DataError(f"--out {args.out}: cannot write there ({e.strerror})") from None
    print(f"wrote a Hugging Face tokenizer to {out}")


def _load(path):
    from hanuman_jax.tokenizer.core import Tokenizer

    try:
        return Tokenizer(path)
    except (OSError, ValueError) as e:
        raise DataError(f"--model {path}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser("hanuman_jax.tokenizer", "Train, evaluate or export the tokenizer.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the Unigram SentencePiece model")
    t.add_argument("--input", nargs="+", required=True, help="files or globs: .txt or .jsonl")
    t.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--vocab-size", type=int, default=96_000, help="pieces in the vocabulary")
    t.add_argument("--field", help="JSONL key holding the text (default: known schemas)")
    t.add_argument("--thai-digits", choices=("keep", "to-arabic"), default="keep",
                   help="Thai digits as they are, or as 0-9")  # fmt: skip
    t.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="sample at most this many lines (uniformly, streaming)")  # fmt: skip
    t.add_argument("--balance", type=float, default=BALANCE,
                   help="each --input's share of the sample ~ its characters ** BALANCE; 1 "
                   "keeps the corpus proportions, 0 gives every input the same share")  # fmt: skip
    t.add_argument("--max-piece-chars", type=int, default=MAX_PIECE_CHARS,
                   help="longest piece in characters; 24 compresses the training text's own "
                   "Thai better and other text worse (BENCHMARKS.md)")  # fmt: skip
    t.add_argument(
        "--character-coverage",
        type=float,
        default=0.99995,
        help="share of characters the vocabulary covers; the rest fall back to bytes",
    )
    t.add_argument("--prune-pool", type=float, default=PRUNE_POOL,
                   help="train this many times --vocab-size pieces, then keep those that save "
                   "most tokens; 1: SentencePiece's choice, the likeliest")  # fmt: skip
    t.add_argument("--seed", type=int, default=0, help="sampling seed")
    t.set_defaults(run=_train)

    e = sub.add_parser("evaluate", help="compression, unknowns and round trip on some text")
    e.add_argument("--model", required=True, help="a SentencePiece .model file")
    e.add_argument("--input", nargs="+", required=True, help="files or globs: .txt or .jsonl")
    e.add_argument("--field", help="JSONL key holding the text (default: known schemas)")
    e.add_argument("--words", help="a word-segmented file ('|' between words)")
    e.set_defaults(run=_evaluate)

    x = sub.add_parser("export-hf", help="write a transformers AutoTokenizer directory")
    x.add_argument("--model", required=True, help="a SentencePiece .model file")
    x.add_argument("--out", required=True, help="directory to write")
    x.set_defaults(run=_export_hf)

    args = parser.parse_args(argv)
    if args.command == "train":
        if args.vocab_size < MIN_VOCAB:
            parser.error(f"--vocab-size must be at least {MIN_VOCAB} (special, byte and digit "
                         "pieces take 287)")  # fmt: skip
        if args.max_sentences < 1:
            parser.error("--max-sentences must be >= 1")
        if not 0 <= args.balance <= 1:
            parser.error("--balance must be in [0, 1]")
        if not 0 < args.character_coverage <= 1:
            parser.error("--character-coverage must be in (0, 1]")
        if not 1 <= args.max_piece_chars <= 64:
            parser.error("--max-piece-chars must be in [1, 64]")
        if not 1 <= args.prune_pool <= 4:
            parser.error("--prune-pool must be in [1, 4]")
    try:
        args.run(args)
    except DataError as err:
        return cli.fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
