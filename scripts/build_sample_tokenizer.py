"""Rebuilds the bundled sample tokenizer (hanuman_jax/assets/sample/tokenizer.model).

python scripts/build_sample_tokenizer.py [--vocab-size 4096]
"""

from __future__ import annotations

import argparse

from hanuman_jax.data import BUNDLED_DIR, read_documents
from hanuman_jax.tokenizer import train_tokenizer


def sample_texts():
    for path in sorted(BUNDLED_DIR.glob("*.txt")) + sorted(BUNDLED_DIR.glob("*.jsonl")):
        for doc in read_documents(path):
            if doc.messages is None:
                yield doc.text
            else:
                yield from (m["content"] for m in doc.messages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    path = train_tokenizer(sample_texts(), BUNDLED_DIR / "tokenizer", args.vocab_size)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
