"""Loading `configs/*.py` files, `--config.a.b=value` overrides, and checking the whole config."""

from __future__ import annotations

import ast
import importlib.util
import traceback
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from hanuman_jax.config.fields import ConfigError, check
from hanuman_jax.config.mesh import MeshConfig, check_batch_divides
from hanuman_jax.config.model import ModelConfig
from hanuman_jax.config.sections import DataConfig, OptimizerConfig, TrainConfig, data_schedule

SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a file, applies `--config.a.b=value` overrides, validates."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    cfg = _run_get_config(path)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"--config {path}: get_config() must return an ml_collections.ConfigDict")
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def _run_get_config(path: Path):
    """What the file's `get_config()` returns; a file that is not Python, does not parse, or
    fails while it runs is one line naming the file and the line."""
    spec = importlib.util.spec_from_file_location(f"_hanuman_config_{path.stem}", path)
    if spec is None:
        raise ConfigError(f"--config {path}: not a Python file; a config is a .py file that "
                          "defines get_config()")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"--config {path}: the file defines no get_config()")
        return module.get_config()
    except ConfigError:
        raise
    except Exception as e:
        frames = traceback.extract_tb(e.__traceback__)
        lines = [f.lineno for f in frames if f.filename == spec.origin]  # an absolute path
        if isinstance(e, SyntaxError) and e.filename == spec.origin:  # it never ran: no frame
            lines.append(e.lineno)
        where = f"{path}:{lines[-1]}" if lines else str(path)
        reason = e.msg if isinstance(e, SyntaxError) else str(e).split("\n")[0]
        what = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
        raise ConfigError(f"--config {where}: {what}") from None


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks each section, then the rules that span sections; raises ConfigError on the first."""
    for name in SECTIONS:
        if name not in cfg:
            raise ConfigError(f"config has no section {name!r}; sections: {', '.join(cfg)}")
    typed = {name: section.from_config(cfg[name]) for name, section in SECTIONS.items()}
    check_across(typed["model"], typed["data"], typed["train"], typed["mesh"])


def check_across(
    model: ModelConfig, data: DataConfig, train: TrainConfig, mesh: MeshConfig
) -> None:
    """The rules that span sections; each section has checked its own fields."""
    check(
        data.seq_len <= model.max_seq_len,
        "data.seq_len",
        data.seq_len,
        f"must be <= model.max_seq_len ({model.max_seq_len})",
    )
    data_schedule.check_phase_starts(data.seq_len_schedule, train.steps)
    for length in data.row_lengths():
        model.check_row_length(length)
    check(
        train.eval_every == 0 or len(data.eval_sources) > 0,
        "train.eval_every",
        train.eval_every,
        "needs data.eval_sources to evaluate on",
    )
    check_batch_divides(train.batch_size, train.grad_accum_steps, *mesh.batch_split())
    experts = model.moe.num_experts
    check(
        not experts or mesh.expert == -1 or experts % mesh.expert == 0,
        "mesh.expert",
        mesh.expert,
        f"must divide model.moe.num_experts ({experts})",
    )
    check(
        mesh.tensor == -1 or model.num_kv_heads % mesh.tensor == 0,
        "mesh.tensor",
        mesh.tensor,
        f"must divide model.num_kv_heads ({model.num_kv_heads})",
    )


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
    """Applies one `[--config.]a.b=value` override, converting the value to the field's type."""
    text = item.removeprefix("--").removeprefix("config.")
    if "=" not in text:
        raise ConfigError(f"override {item!r}: expected --config.section.key=value")
    key, raw = text.split("=", 1)
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(_unknown_key(".".join(parents[: i + 1]), node))
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(_unknown_key(key, node))
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config {key} is a section; set one of its keys: {', '.join(current)}")
    with node.unlocked():
        node[leaf] = _parse_value(key, raw, current)


def _unknown_key(key: str, node) -> str:
    valid = ", ".join(sorted(node)) if isinstance(node, ml_collections.ConfigDict) else "none"
    return f"config {key} does not exist; valid keys here: {valid}"


def _parse_value(key: str, raw: str, current):
    if isinstance(current, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"config {key}={raw!r}: expected a bool (true/false)")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"config {key}={raw!r}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"config {key}={raw!r}: expected a number") from None
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"config {key}={raw!r}: expected a Python literal like {current!r}"
        ) from None
    if isinstance(current, (list, tuple)) and not isinstance(value, (list, tuple)):
        raise ConfigError(f"config {key}={raw!r}: expected a list like {current!r}")
    return type(current)(value) if isinstance(current, (list, tuple)) else value
