"""The command lines' shared conventions: defaults in --help, kebab-case flags with their
underscore spellings as aliases, `--config NAME`, console scripts, and logs that spare the bar."""

import argparse
import importlib
import io
import logging
import tomllib
from pathlib import Path

import pytest
import tqdm

from hanuman_jax import cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


class _Stop(Exception):
    pass


def _parser(entry: str, monkeypatch) -> cli.Parser:
    """The parser that a console script's main builds, caught as it starts parsing."""
    module, _, name = entry.partition(":")
    main = getattr(importlib.import_module(module), name)
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise _Stop

    with monkeypatch.context() as m:
        m.setattr(cli.Parser, "parse_known_args", catch)
        with pytest.raises(_Stop):
            main(["--help"])
    return caught[0]


def _parsers(parser: argparse.ArgumentParser, prefix=()):
    """(subcommand path, parser) for the parser and each of its subcommands."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*prefix, name))


def _sample(action: argparse.Action) -> list[str]:
    """A value the action accepts, as argv items."""
    if action.nargs == 0:
        return []
    if action.type is cli.config_path:
        return ["tiny"]
    if action.choices:
        return [str(next(iter(action.choices)))]
    return ["3"] if action.type in (int, float) else ["x"]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_shows_defaults(script, monkeypatch, capsys):
    for path, parser in _parsers(_parser(SCRIPTS[script], monkeypatch)):
        text = parser.format_help()
        for action in parser._actions:
            if action.default is None or action.default is False or action.help is None:
                continue
            if action.default == argparse.SUPPRESS:
                continue
            if "default" not in (action.help or ""):
                assert f"(default: {action.default})" in " ".join(text.split()), (path, action)
        for option in (s for a in parser._actions for s in a.option_strings):
            assert "_" not in option, f"{script} {' '.join(path)}: {option} is not kebab-case"
            assert "--" + option[2:].replace("-", "_") not in text or "-" not in option[2:]
    module = SCRIPTS[script].partition(":")[0]
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main(["--help"])
    assert exit.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_underscore_spellings_parse_the_same(script, monkeypatch):
    """Every flag at once, spelled both ways: the same namespace, nothing left over."""
    top = _parser(SCRIPTS[script], monkeypatch)
    for path, parser in _parsers(top):
        options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        if not options:
            continue
        kebab = [*path]
        for action in options:
            kebab += [action.option_strings[0], *_sample(action)]
        under = ["--" + arg[2:].replace("-", "_") if arg.startswith("--") else arg for arg in kebab]
        args, rest = top.parse_known_args(kebab)
        assert rest == [] and top.parse_known_args(under) == (args, []), (script, path, under)


def test_underscores_only_for_known_flags():
    known = {"--max-new-tokens", "--top-k"}
    argv = ["--max_new_tokens=5", "--top_k", "3", "--config.train.log_every=2", "--other_flag",
            "--", "--top_k"]  # fmt: skip
    assert cli._kebab(argv, known) == ["--max-new-tokens=5", "--top-k", "3",
                                       "--config.train.log_every=2", "--other_flag",
                                       "--", "--top_k"]  # fmt: skip


def test_unknown_arguments_are_an_error(capsys):
    from hanuman_jax.train import parse_args

    args, overrides = parse_args(["--config", "tiny", "--config.train.steps=3", "--dry_run"])
    assert args.dry_run and overrides == ["--config.train.steps=3"]
    with pytest.raises(SystemExit):
        parse_args(["--config", "tiny", "--dry-runn"])
    assert "unrecognized arguments: --dry-runn" in capsys.readouterr().err


def test_config_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = Path(cli.config_path("tiny"))
    assert packaged.read_bytes() == (ROOT / "configs" / "tiny.py").read_bytes()
    assert cli.config_path("tiny_stage_b.py") == str(packaged.with_name("tiny_stage_b.py"))
    assert cli.config_path("configs/tiny.py") == "configs/tiny.py"  # a path: as given
    (tmp_path / "tiny").write_text("")
    assert cli.config_path("tiny") == "tiny"  # a file here wins over the packaged config
    with pytest.raises(argparse.ArgumentTypeError, match="no packaged config named 'tinny'.*tiny,"):
        cli.config_path("tinny")


def _screen(raw: str) -> list[str]:
    """What a terminal shows of `raw`: '\\r' returns to the line's start, and text overwrites."""
    lines = []
    for line in raw.split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part) :]
        lines.append(shown.rstrip())
    return lines


@pytest.mark.parametrize("handler", [cli.TqdmHandler, logging.StreamHandler])
def test_log_lines_do_not_break_the_bar(handler):
    stream = io.StringIO()
    log = logging.getLogger("hanuman_jax.test_cli")
    log.propagate, log.handlers = False, [handler(stream)]
    log.setLevel(logging.INFO)
    bar = tqdm.tqdm(total=10, file=stream, ncols=60, mininterval=0)
    bar.update(3)
    log.info("saved checkpoint 3")
    bar.update(1)
    bar.close()
    lines = _screen(stream.getvalue())
    clean = "saved checkpoint 3" in lines  # the log line alone on its line
    assert clean == (handler is cli.TqdmHandler), lines
    assert any("4/10" in line for line in lines)


def test_setup_logging_routes_through_tqdm(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []  # basicConfig(force=True) would close pytest's own handlers
    try:
        cli.setup_logging()
        assert [type(h) for h in root.handlers] == [cli.TqdmHandler]
        assert logging.getLogger("orbax").level == logging.WARNING
        logging.getLogger("hanuman_jax").info("hello")
        assert capsys.readouterr().err.rstrip().endswith("INFO hello")
    finally:
        root.handlers[:], root.level = saved
