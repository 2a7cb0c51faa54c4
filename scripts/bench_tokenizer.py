"""Our tokenizer pipeline vs plain SentencePiece (default options), in and out of domain.

    python scripts/bench_tokenizer.py [--data ../shared/data] [--ood DIR]
        [--vocab-sizes 32000 96000] [--ablation] [--take N] [--seed N] [--text NAME=FILE]

Each split trains both tokenizers on the same lines, one file per source (news, social, English):
ours samples them as `--balance` says, plain reads them as they are. Every 10th document of each
source is held out and never trained on.
- `all`: trained on the three sources. Scored on the held-out Thai and English lines, on the
  human word segmentation of wisesight-1000 (tokens per word; kept out of training), and on the
  out-of-domain texts of scripts/ood_text.py, which none of the sources holds: legal Thai and
  English (the UDHR) and Thai Wikipedia titles.
- `without_news`, `without_social`, `without_english`: trained on the other two sources, scored
  on the held-out lines of the one left out (and wisesight's words without social).
A corpus too small for the vocabulary size (SentencePiece: "at most N pieces") trains both at N.
Plain SentencePiece answers `<unk>` (one token for a run of characters it lacks, which loses them);
ours spells them in bytes. Plain with byte fallback, which never answers `<unk>` either, is also
trained and scored as the lossless reference (`behind_lossless`).
`--ablation` also trains ours with each of its choices put back to plain SentencePiece's, at the
first vocabulary size, to show what each choice does. `--seed N`: ours (and each variant) samples
its training lines with seed N (default 0, the trainer's): how much a measure moves from one
sample of the same corpus to another. `--take N` keeps each source's first N documents (a
quick run). `--trainer-option KEY=VALUE` (repeatable) passes a SentencePiece trainer option to
ours and each variant, e.g. `split_by_unicode_script=false` (VALUE is read as JSON, else text).
`--text NAME=FILE` (repeatable) scores the file's lines too, in the `all` split, like the
out-of-domain texts (e.g. an indented English licence: plain deletes runs of spaces, ours keeps
them). The `all` split also checks the Hugging Face export's ids and times our
`Tokenizer.encode` against the raw `SentencePieceProcessor.encode`.
Last line: one JSON object; `behind` lists each measure where ours is behind plain.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import unicodedata
from pathlib import Path

import sentencepiece as spm
from ood_text import DEFAULT_DIR
from ood_text import load as load_ood

from hanuman_jax.data import DataError, iter_records
from hanuman_jax.tokenizer import Tokenizer
from hanuman_jax.tokenizer.core import normalization_rules, normalize, rules_tsv
from hanuman_jax.tokenizer.evaluate import script_of, tokens_per_word
from hanuman_jax.tokenizer.train import (
    BALANCE,
    corpus_sources,
    iter_documents,
    row_texts,
    train_tokenizer,
)

SOURCES = ("news", "social", "english")
SOCIAL_FILES = ("thai_social/pos.txt", "thai_social/neg.txt", "thai_social/q.txt")
# Each of our choices changed back, one at a time: to plain SentencePiece's option, or to our
# default before (train_ours's keyword arguments)
ABLATIONS = {
    "no space before a line's first ASCII word (before)": {"word_space": False},
    "a space before every text (plain's; ours before)": {
        "options": {"add_dummy_prefix": True},
        "word_space": False,
    },
    "no-break-space runs kept (before)": {"nbsp_runs": False},
    "no length penalty (plain's; ours before)": {"length_penalty": 0.0},
    "two EM steps between prunings (plain's; ours before)": {"options": {"num_sub_iterations": 2}},
    "the pieces of highest probability (plain's; ours before)": {"prune_pool": 1.0},
    "only the runs of spaces SentencePiece learned (ours before; plain deletes runs)": {
        "space_runs": 1
    },
    "balance 1.0 (the sources as they are, as plain reads them)": {"balance": 1.0},
    "character_coverage 0.9995 (plain's)": {"character_coverage": 0.9995},
    "no byte fallback: <unk> instead (plain's)": {"options": {"byte_fallback": False}},
    "all of 2026-12-05's (a space before every text, runs kept, no length penalty, 2 EM steps,"
    " pieces by probability)": {
        "options": {"add_dummy_prefix": True, "num_sub_iterations": 2},
        "word_space": False,
        "nbsp_runs": False,
        "length_penalty": 0.0,
        "prune_pool": 1.0,
    },
}


def trainer_option(text: str) -> tuple[str, object]:
    """KEY=VALUE from the command line: VALUE as JSON (false, 1, 0.5), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. num_sub_iterations=1")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def text_file(text: str) -> tuple[str, list[str]]:
    """NAME=FILE from the command line: (NAME, the file's lines)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FILE, e.g. gpl3=COPYING")
    try:
        return name.strip(), Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"--text {text}: cannot read {path} ({e})") from None


def split_corpus(data: Path, take: int | None = None) -> tuple[dict, dict]:
    """Each source's training lines and held-out lines: every 10th document is held out (a news
    row, title and text together, or a social or English line), less the lines that also occur
    in training. wisesight-1000's lines are kept out of both: they measure tokens per word."""
    segmented = (data / "thai_social" / "wisesight-1000-samples-tokenised.txt").read_text()
    excluded = {line.strip() for line in segmented.splitlines()}
    news = iter_records(data / "thai_news" / "thaigov_train.jsonl")
    docs = {"news": ["\n".join(row_texts(row, where)) for where, row in news]}
    docs["social"] = [text for name in SOCIAL_FILES for _, text in iter_records(data / name)
                      if text.strip() not in excluded]  # fmt: skip
    docs["english"] = [text for _, text in iter_records(data / "english" / "tinyshakespeare.txt")]
    train: dict[str, list[str]] = {source: [] for source in SOURCES}
    held: dict[str, list[str]] = {source: [] for source in SOURCES}
    i = 0  # counted across sources, as the first version of this benchmark did
    for source in SOURCES:
        for doc in docs[source][:take]:
            lines = [line for line in doc.splitlines() if line.strip()]
            (held if i % 10 == 9 else train)[source].extend(lines)
            i += 1
    # a held-out line that a trained document also holds (a news sign-off, a speaker's name) is
    # trained on: it is left out of the held-out text
    trained_lines = {line for lines in train.values() for line in lines}
    held = {source: [x for x in lines if x not in trained_lines] for source, lines in held.items()}
    return train, held


def eval_sets(split: str, held: dict, ood: dict | None, words: list[str]) -> dict:
    """What a split is scored on: name -> ("chars", lines) or ("words", segmented lines)."""
    if split != "all":
        left_out = split.removeprefix("without_")
        sets = {left_out: ("chars", held[left_out])}
        return sets | ({"wisesight_words": ("words", words)} if left_out == "social" else {})
    lines = [x for source in SOURCES for x in held[source]]
    sets = {
        "thai": ("chars", [x for x in lines if script_of(x) in ("thai", "mixed")]),
        "english": ("chars", [x for x in lines if script_of(x) == "latin"]),
        "wisesight_words": ("words", words),
    }
    return sets | {name: ("chars", text) for name, text in (ood or {}).items()}


class Plain:
    """A plain SentencePiece model with the .encode that tokens_per_word wants."""

    def __init__(self, path: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.encode = self.sp.encode


def score(tokenizer, sets: dict) -> dict:
    """chars/token or tokens/word for each set, with its <unk> count; ours: its round trip too."""
    out = {}
    for name, (kind, lines) in sets.items():
        if kind == "words":
            out[name] = {"tokens_per_word": round(tokens_per_word(tokenizer, lines), 4)}
            continue
        ids = [tokenizer.encode(x) for x in lines]  # each line encoded once, for every figure
        chars = sum(len(unicodedata.normalize("NFC", x)) for x in lines)
        row = {"chars_per_token": round(chars / max(sum(map(len, ids)), 1), 4),
               "unk": sum(i.count(0) for i in ids)}  # fmt: skip
        if isinstance(tokenizer, Tokenizer):  # as evaluate.measure counts it
            pairs = zip(ids, lines, strict=True)
            whole = sum(tokenizer.decode(i) == tokenizer.normalize(x) for i, x in pairs)
            row["roundtrip"] = round(whole / max(len(lines), 1), 4)
        out[name] = row
    return out


def supported_size(message: str) -> int | None:
    """N from SentencePiece's (or train_tokenizer's) "vocabulary too large" message."""
    found = re.search(r"(?:value <=|at most) (\d+)", message)
    return int(found.group(1)) if found else None


def train_plain(files: list[str], prefix: Path, vocab_size: int, **options) -> Plain:
    spm.SentencePieceTrainer.train(input=",".join(files), model_prefix=str(prefix),
                                   vocab_size=vocab_size, minloglevel=2, **options)  # fmt: skip
    return Plain(Path(f"{prefix}.model"))


def train_ours(
    files: list[str], prefix: Path, vocab_size: int, nbsp_runs: bool = True, **kwargs
) -> Tokenizer:
    """`nbsp_runs=False`: without the rule that makes a run of spaces holding a no-break space one
    space, in the training text and in the model."""
    if nbsp_runs:
        sources = corpus_sources(files, None, "keep")
    else:
        sources = [(normalize(doc, nbsp_runs=False) for doc in iter_documents([f])) for f in files]
        tsv = prefix.with_suffix(".rules.tsv")
        tsv.write_text(rules_tsv(normalization_rules(nbsp_runs=False)), encoding="utf-8")
        kwargs["options"] = {**kwargs.get("options", {}), "normalization_rule_tsv": str(tsv)}
    return Tokenizer(train_tokenizer(sources, prefix, vocab_size, **kwargs))


class TooLarge(Exception):
    """The corpus supports at most `size` pieces."""

    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


def timed(train_fn, vocab_size: int):
    """(train_fn(vocab_size), seconds); TooLarge when the corpus is too small for the size."""
    start = time.perf_counter()
    try:
        return train_fn(vocab_size), time.perf_counter() - start
    except (RuntimeError, DataError) as e:
        size = supported_size(str(e))
        if size is None or size >= vocab_size:
            raise
        raise TooLarge(size) from None


def run_split(
    split: str,
    train: dict,
    tmp: Path,
    vocab_size: int,
    variants: dict,
    seed: int = 0,
    base: dict | None = None,
) -> dict:
    """Trains plain, plain with byte fallback and ours (and each variant of ours) on the split's
    sources, all at one size: `vocab_size`, or the smallest of the sizes the corpus supports
    for each of them when it is too small (SentencePiece names it). `base`: train_tokenizer's
    keyword arguments for ours and each variant (a variant's own, options included, win)."""
    files = []
    for source in SOURCES:
        if split == "all" or split != f"without_{source}":
            files.append(str(tmp / f"{split}_{source}.txt"))
            Path(files[-1]).write_text("\n".join(train[source]) + "\n", encoding="utf-8")
    base = base or {}
    ours = {name: base | kwargs | {"options": base.get("options", {}) | kwargs.get("options", {})}
            for name, kwargs in {"ours": {}, **variants}.items()}  # fmt: skip
    trainers = {
        "plain": lambda n: train_plain(files, tmp / "plain", n),
        # the lossless reference: plain with byte fallback, which never answers <unk> either
        "plain_byte_fallback": lambda n: train_plain(files, tmp / "bytes", n, byte_fallback=True),
        **{name: (lambda n, i=i, k=kwargs: train_ours(files, tmp / f"ours_{i}", n, seed=seed, **k))
           for i, (name, kwargs) in enumerate(ours.items())},
    }  # fmt: skip
    size = vocab_size
    while True:
        try:
            out = {name: timed(fn, size) for name, fn in trainers.items()}
            return {"vocab_size": size, **out}
        except TooLarge as e:  # train every one again at the smaller size
            size = e.size


def piece_count(tokenizer) -> int:
    return tokenizer.sp.get_piece_size()


def behind(ours: dict, plain: dict) -> list[str]:
    """The measures where ours is behind plain (fewer chars/token, more tokens/word)."""
    lost = []
    for name, row in ours.items():
        if not isinstance(row, dict):  # train_s, pieces
            continue
        if "chars_per_token" in row and row["chars_per_token"] < plain[name]["chars_per_token"]:
            lost.append(f"{name} chars/token")
        if "tokens_per_word" in row and row["tokens_per_word"] > plain[name]["tokens_per_word"]:
            lost.append(f"{name} tokens/word")
    return lost


def hf_parity(ours: Tokenizer, lines: list[str], out: Path) -> dict:
    """Lines where the exported Hugging Face tokenizer's ids differ from ours."""
    from transformers import AutoTokenizer

    from hanuman_jax.tokenizer.hf import export_hf

    export_hf(ours.path, out)
    hf = AutoTokenizer.from_pretrained(out)  # transformers 5 builds the fast one either way
    got = hf(lines, add_special_tokens=False)["input_ids"]
    mismatches = sum(g != ours.encode(x) for g, x in zip(got, lines, strict=True))
    return {"lines": len(lines), "mismatches": mismatches}


def encode_speed(ours: Tokenizer, lines: list[str]) -> dict:
    """Our Tokenizer.encode against the raw SentencePieceProcessor.encode of the same model."""
    best = {"tokenizer_encode": float("inf"), "raw_sp_encode": float("inf")}
    for _ in range(7):  # interleaved rounds, so a noisy spell hits both alike; best of each
        for name, fn in (("tokenizer_encode", ours.encode), ("raw_sp_encode", ours.sp.encode)):
            start = time.perf_counter()
            for line in lines:
                fn(line)
            best[name] = min(best[name], time.perf_counter() - start)
    chars = sum(len(x) for x in lines)
    return {"encode_chars_per_s": {k: round(chars / v) for k, v in best.items()},
            "encode_ratio": round(best["raw_sp_encode"] / best["tokenizer_encode"], 3)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data")
    )
    p.add_argument("--ood", type=Path, default=DEFAULT_DIR, help="scripts/ood_text.py's folder")
    p.add_argument("--vocab-sizes", type=int, nargs="+", default=[32_000, 96_000])
    p.add_argument("--splits", nargs="+", default=["all", *(f"without_{s}" for s in SOURCES)])
    p.add_argument("--balance", type=float, default=BALANCE)
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--take", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="ours' sampling seed")
    p.add_argument("--no-parity", action="store_true", help="skip the HF ids and encode timing")
    p.add_argument("--text", type=text_file, action="append", default=[], metavar="NAME=FILE",
                   help="also score FILE's lines in the `all` split; repeatable")  # fmt: skip
    p.add_argument(
        "--trainer-option",
        type=trainer_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="SentencePiece option for ours and each variant; repeatable",
    )

    a = p.parse_args()
    if not 0 <= a.balance <= 1:
        p.error("--balance must be in [0, 1]")
    data = Path(a.data)
    base = {"balance": a.balance, "options": dict(a.trainer_option)}
    ood = load_ood(a.ood)
    taken = [*eval_sets("all", {s: [] for s in SOURCES}, ood, []), *(name for name, _ in a.text)]
    if twice := sorted({name for name in taken if taken.count(name) > 1}):
        p.error(
            f"--text {', '.join(twice)}: the name is taken (a benchmark text or another --text)"
        )
    if ood is None:
        print(f"no out-of-domain text in {a.ood}: run scripts/ood_text.py to fetch it", flush=True)
    ood = (ood or {}) | dict(a.text)
    train, held = split_corpus(data, a.take)
    words = (data / "thai_social" / "wisesight-1000-samples-tokenised.label").read_text()
    words = words.splitlines()
    result: dict = {"seed": a.seed, "balance": a.balance, "trainer_options": base["options"],
                    "train_lines": {s: len(train[s]) for s in SOURCES},
                    "heldout_lines": {s: len(held[s]) for s in SOURCES},
                    "runs": [], "behind": [], "behind_lossless": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for vocab_size in a.vocab_sizes:
            variants = ABLATIONS if a.ablation and vocab_size == a.vocab_sizes[0] else {}
            for split in a.splits:
                models = run_split(split, train, Path(tmp), vocab_size, variants, a.seed, base)
                sets = eval_sets(split, held, ood, words)
                row = {"vocab_size": vocab_size, "trained_size": models["vocab_size"],
                       "split": split}  # fmt: skip
                for name in ("plain", "plain_byte_fallback", "ours", *variants):
                    tok, secs = models[name]
                    row[name] = score(tok, sets) | {"train_s": round(secs, 1),
                                                    "pieces": piece_count(tok)}  # fmt: skip
                row["behind"] = behind(row["ours"], row["plain"])
                row["behind_lossless"] = behind(row["ours"], row["plain_byte_fallback"])
                for key in ("behind", "behind_lossless"):
                    result[key] += [f"{vocab_size} {split} {x}" for x in row[key]]
                result["runs"].append(row)
                print(json.dumps(row, ensure_ascii=False), flush=True)
                if split == "all" and vocab_size == a.vocab_sizes[0] and not a.no_parity:
                    ours = models["ours"][0]
                    every = [x for s in SOURCES for x in train[s] + held[s]]
                    result["hf_parity"] = hf_parity(ours, every, Path(tmp) / "hf")
                    result |= encode_speed(ours, [x for s in SOURCES for x in held[s]])
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
