"""`python -m hanuman_jax.data prepare --config NAME --output DIR [--config.a.b=v]`: tokenize a
config's sources into shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hanuman_jax import cli
from hanuman_jax.config import ConfigError, load_config
from hanuman_jax.data.schemas import DataError


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser("hanuman_jax.data", "Prepare training data.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser(
        "prepare", help="tokenize the config's sources into ArrayRecord shards for training"
    )
    cli.add_config_flag(prep)
    prep.add_argument("--output", required=True, help="directory for the shards")
    prep.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    args, rest = cli.parse_with_overrides(parser, argv)
    try:
        from hanuman_jax.data.prepare import prepare
        from hanuman_jax.training.loop import load_tokenizer

        cfg = load_config(args.config, rest)
        tokenizer = load_tokenizer(cfg)
        result = prepare(cfg, tokenizer.path, Path(args.output), args.workers or None)
    except (ConfigError, DataError) as e:
        return cli.fail(e)
    print("train on the shards with:")
    for field, sources in result.items():
        if sources:
            print(f"  --config.data.{field}={json.dumps(sources)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
