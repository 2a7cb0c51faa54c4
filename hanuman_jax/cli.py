"""Conventions every command line shares: kebab-case flags (the old underscore spellings still
parse), defaults in --help, `--config NAME` for a config shipped with the package, and log lines
written through tqdm so that they do not break a progress bar."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import tqdm

import hanuman_jax

# Third-party loggers that report every compilation and checkpoint file at INFO.
NOISY_LOGGERS = ("absl", "orbax", "jax")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, unless it is None, a store_true's False, or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default is None or action.default is False or "default" in help:
            return help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that also accepts `--foo_bar` for each of its `--foo-bar` flags."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)  # subcommands too

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(_kebab(args, set(_option_strings(self))), namespace)


def make_parser(module: str, description: str | None = None) -> Parser:
    """The parser of `python -m MODULE` (named after the console script when run as one)."""
    script = Path(sys.argv[0]).name
    prog = script if script.startswith("hanuman-") else f"python -m {module}"
    return Parser(prog=prog, description=description)


def parse_with_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """The flags, and the --config.section.key=value overrides apart; anything else unknown is
    an error."""
    args, rest = parser.parse_known_args(argv)
    if bad := [item for item in rest if not item.startswith("--config.")]:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, rest


def _option_strings(parser: argparse.ArgumentParser) -> Iterator[str]:
    """Every option string of `parser` and of its subcommands."""
    for action in parser._actions:
        yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _option_strings(sub)


def _kebab(args: list[str], known: set[str]) -> list[str]:
    """`--max_new_tokens[=v]` as `--max-new-tokens[=v]` where that is a flag; the rest as it is."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        name, eq, value = arg.partition("=")
        kebab = name.replace("_", "-")
        out.append(kebab + eq + value if name.startswith("--") and kebab in known else arg)
    return out


def fail(error: Exception) -> int:
    """A user's mistake as one line `error: ...` on stderr; returns the exit code 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def packaged_configs() -> Path | None:
    """The directory of the configs that ship with hanuman_jax: inside the installed package, or
    the source checkout's configs/ (an editable install)."""
    package = Path(hanuman_jax.__file__).parent
    for where in (package / "configs", package.parent / "configs"):
        if where.is_dir():
            return where
    return None


def config_path(value: str) -> str:
    """argparse type of --config: a file, or the bare name of a packaged config (`tiny`)."""
    path = Path(value)
    if path.is_file() or len(path.parts) != 1:
        return value  # a path: load_config reports a missing file
    where = packaged_configs()
    name = path.stem if path.suffix == ".py" else path.name
    if where is not None and (where / f"{name}.py").is_file():
        return str(where / f"{name}.py")
    names = sorted(p.stem for p in where.glob("*.py")) if where is not None else []
    raise argparse.ArgumentTypeError(
        f"no file {value!r} here and no packaged config named {name!r} "
        f"(packaged: {', '.join(names) or 'none'})"
    )


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """--config FILE or NAME, overridable field by field with --config.section.key=value."""
    parser.add_argument(
        "--config",
        type=config_path,
        required=True,
        metavar="FILE|NAME",
        help="a configs/*.py file, or the name of a packaged config (tiny, hanuman_1b_moe, ...); "
        "override any field with --config.section.key=value",
    )


class TqdmHandler(logging.Handler):
    """Writes log records with tqdm.write, which clears the bars on screen and redraws them."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream  # None: sys.stderr as it is when the record comes

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream or sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(level: int = logging.INFO, fmt: str = "%(asctime)s %(levelname)s %(message)s"):
    """The root logger through TqdmHandler at `level`; NOISY_LOGGERS at WARNING."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
