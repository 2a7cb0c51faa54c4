"""Our tokenizer pipeline vs plain SentencePiece (default options) on ../shared/data.

    python scripts/bench_tokenizer.py [--data ../shared/data] [--vocab-size 32000]

Every 10th document is held out; both tokenizers train on the other nine tenths (the same lines,
one file per source: news, social, English; ours balances the sources as `--balance` says, plain
reads them as they are) with the same vocabulary size, then are measured on the held-out Thai
and English lines and on the human word segmentation of wisesight-1000 (not trained on). Also
times our `Tokenizer.encode` against the raw `SentencePieceProcessor.encode` of the same model.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import unicodedata
from pathlib import Path

import sentencepiece as spm

from hanuman_jax.data import iter_records
from hanuman_jax.tokenizer import Tokenizer
from hanuman_jax.tokenizer.evaluate import script_of, tokens_per_word
from hanuman_jax.tokenizer.train import BALANCE, corpus_sources, row_texts, train_tokenizer


def split_corpus(data: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Every 10th document held out: a news row (title and text together) or a social/English
    line. wisesight-1000's lines are kept out of training: they measure tokens per word.
    Returns the training lines of each source (news, social, english) and the held-out lines."""
    segmented = (data / "thai_social" / "wisesight-1000-samples-tokenised.txt").read_text()
    excluded = {line.strip() for line in segmented.splitlines()}
    docs = [
        ("news", "\n".join(row_texts(row, where)))
        for where, row in iter_records(data / "thai_news" / "thaigov_train.jsonl")
    ]
    for source, name in (("social", "thai_social/pos.txt"), ("social", "thai_social/neg.txt"),
                         ("social", "thai_social/q.txt"),
                         ("english", "english/tinyshakespeare.txt")):  # fmt: skip
        docs += [(source, text) for _, text in iter_records(data / name)
                 if text.strip() not in excluded]  # fmt: skip
    train: dict[str, list[str]] = {"news": [], "social": [], "english": []}
    held: list[str] = []
    for i, (source, doc) in enumerate(docs):
        lines = [line for line in doc.splitlines() if line.strip()]
        (held if i % 10 == 9 else train[source]).extend(lines)
    return train, held


def chars_per_token(encode, lines: list[str]) -> float:
    chars = sum(len(unicodedata.normalize("NFC", line)) for line in lines)
    return chars / sum(len(encode(line)) for line in lines)


def hf_parity(ours: Tokenizer, lines: list[str], out: Path) -> dict:
    """Lines where the exported Hugging Face tokenizer's ids differ from ours (slow and fast)."""
    from transformers import AutoTokenizer

    from hanuman_jax.tokenizer.hf import export_hf

    export_hf(ours.path, out)
    result = {"lines": len(lines)}
    for name, use_fast in (("fast", True), ("slow", False)):
        hf = AutoTokenizer.from_pretrained(out, use_fast=use_fast)
        got = hf(lines, add_special_tokens=False)["input_ids"]
        result[f"{name}_mismatches"] = sum(
            g != ours.encode(x) for g, x in zip(got, lines, strict=True)
        )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data")
    )
    p.add_argument("--vocab-size", type=int, default=32_000)
    p.add_argument("--character-coverage", type=float, default=0.99995)
    p.add_argument("--balance", type=float, default=BALANCE)
    a = p.parse_args()
    data = Path(a.data)
    train, held = split_corpus(data)
    held_th = [x for x in held if script_of(x) in ("thai", "mixed")]
    held_en = [x for x in held if script_of(x) == "latin"]
    words = (data / "thai_social" / "wisesight-1000-samples-tokenised.label").read_text()
    words = words.splitlines()
    result = {"train_lines": sum(map(len, train.values())), "heldout_thai_lines": len(held_th),
              "heldout_english_lines": len(held_en), "vocab_size": a.vocab_size}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        files = []  # one file per source: ours balances them (--balance), plain reads them all
        for source, lines in train.items():
            files.append(str(Path(tmp) / f"train_{source}.txt"))
            Path(files[-1]).write_text("\n".join(lines) + "\n", encoding="utf-8")

        start = time.perf_counter()
        sources = corpus_sources(files, None, "keep")
        ours = Tokenizer(train_tokenizer(sources, Path(tmp) / "ours", a.vocab_size,
                                         character_coverage=a.character_coverage,
                                         balance=a.balance))  # fmt: skip
        ours_s = time.perf_counter() - start

        start = time.perf_counter()
        spm.SentencePieceTrainer.train(input=",".join(files), model_prefix=str(Path(tmp) / "plain"),
                                       vocab_size=a.vocab_size, minloglevel=2)  # fmt: skip
        plain_s = time.perf_counter() - start
        plain = spm.SentencePieceProcessor(model_file=str(Path(tmp) / "plain.model"))

        class Plain:  # tokens_per_word wants an object with .encode
            encode = staticmethod(plain.encode)

        for name, enc, secs, tpw in (
            ("ours", ours.encode, ours_s, tokens_per_word(ours, words)),
            ("plain_sentencepiece", plain.encode, plain_s, tokens_per_word(Plain, words)),
        ):
            result[name] = {
                "train_s": round(secs, 1),
                "thai_chars_per_token": round(chars_per_token(enc, held_th), 4),
                "english_chars_per_token": round(chars_per_token(enc, held_en), 4),
                "thai_tokens_per_word": round(tpw, 4),
                "unk_thai": sum(enc(x).count(0) for x in held_th),
            }
            print(name, json.dumps(result[name]), flush=True)

        every_line = [x for lines in train.values() for x in lines] + held
        result["hf_parity"] = hf_parity(ours, every_line, Path(tmp) / "hf")
        print("hf_parity", json.dumps(result["hf_parity"]), flush=True)

        lines = held_th + held_en
        best = {"tokenizer_encode": float("inf"), "raw_sp_encode": float("inf")}
        for _ in range(7):  # interleaved rounds, so a noisy spell hits both alike; best of each
            for name, fn in (("tokenizer_encode", ours.encode), ("raw_sp_encode", ours.sp.encode)):
                start = time.perf_counter()
                for line in lines:
                    fn(line)
                best[name] = min(best[name], time.perf_counter() - start)
        chars = sum(len(x) for x in lines)
        result["encode_chars_per_s"] = {k: round(chars / v) for k, v in best.items()}
        result["encode_ratio"] = round(best["raw_sp_encode"] / best["tokenizer_encode"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
