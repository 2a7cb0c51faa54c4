"""CLI: python -m hanuman_jax.data prepare --config configs/X.py --output DIR [--config.a.b=v]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hanuman_jax.config import ConfigError, load_config
from hanuman_jax.data.schemas import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hanuman_jax.data")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser(
        "prepare", help="tokenize the config's sources into ArrayRecord shards for training"
    )
    prep.add_argument("--config", required=True, help="path to a configs/*.py file")
    prep.add_argument("--output", required=True, help="directory for the shards")
    prep.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [item for item in rest if not item.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    try:
        from hanuman_jax.data.prepare import prepare
        from hanuman_jax.training.loop import load_tokenizer

        cfg = load_config(args.config, rest)
        tokenizer = load_tokenizer(cfg)
        result = prepare(cfg, tokenizer.path, Path(args.output), args.workers or None)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("train on the shards with:")
    for field, sources in result.items():
        if sources:
            print(f"  --config.data.{field}={json.dumps(sources)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
