"""Loading, overriding and validating `configs/*.py` files."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
ROPE_SCALINGS = ("none", "linear", "llama3")
REMAT_MODES = ("none", "full", "save_matmuls")  # what a block keeps for the backward pass
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
GROUPED_MATMULS = ("blocked", "ragged_dot")
DISPATCHES = ("dropless", "capacity")
MESH_AXES = ("data", "fsdp", "expert", "tensor")
# path: file or glob (.txt, .jsonl, .parquet, or .array_record token shards), hf:OWNER/NAME[:SPLIT]
# or tfds:NAME[/CONFIG]:SPLIT; weight: share of tokens; max_examples: seeded sample of at most this
# many documents (0 = all); field_map: our field name -> the row's (see schemas.py); format: text
# files as "lines" (a document per line) or "paragraphs" (blank-line separated); data_dir: tfds's
SOURCE_KEYS = ("path", "weight", "max_examples", "field_map", "format", "data_dir")
TEXT_FORMATS = ("lines", "paragraphs")
PACKING_MODES = ("concat", "whole")
MAX_LOSS_SCALE = 2.0**24  # float16's dynamic loss scale never grows past this


class ConfigError(ValueError):
    """A user mistake in a config or an override; the message is one actionable line."""


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a file, applies `--config.a.b=value` overrides, validates."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"_hanuman_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config {path}: the file defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"--config {path}: get_config() must return an ml_collections.ConfigDict")
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


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


def _check(ok: bool, key: str, value, valid: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}={value!r} is invalid: {valid}")


def _positive_ints(cfg, section: str, keys: Sequence[str]) -> None:
    for k in keys:
        v = cfg[section][k]
        _check(isinstance(v, int) and v >= 1, f"{section}.{k}", v, "must be an integer >= 1")


def _numbers(tree, prefix: str = ""):
    """(dotted key, value) of every float in a config tree, lists included (`a.b[0].c`)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(tree, float):
        yield prefix, tree


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks every field and combination; raises ConfigError naming the first bad one."""
    for section in ("model", "data", "optimizer", "train", "mesh"):
        if section not in cfg:
            raise ConfigError(f"config has no section {section!r}; sections: {', '.join(cfg)}")
    m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.train
    for key, value in _numbers(cfg.to_dict()):
        _check(math.isfinite(value), key, value, "must be a finite number")
    _check(isinstance(m.vocab_size, int) and m.vocab_size >= 0, "model.vocab_size", m.vocab_size,
           "must be >= 0 (0 = the tokenizer's piece count)")  # fmt: skip
    _positive_ints(cfg, "model", ("num_layers", "d_model", "num_heads"))
    _positive_ints(cfg, "model", ("num_kv_heads", "ffn_hidden", "max_seq_len"))
    _check(
        m.num_heads % m.num_kv_heads == 0,
        "model.num_kv_heads",
        m.num_kv_heads,
        f"must divide model.num_heads ({m.num_heads})",
    )
    _check(
        isinstance(m.head_dim, int) and m.head_dim >= 0,
        "model.head_dim",
        m.head_dim,
        "must be >= 0 (0 means d_model / num_heads)",
    )
    if m.head_dim == 0:
        _check(
            m.d_model % m.num_heads == 0,
            "model.num_heads",
            m.num_heads,
            f"must divide model.d_model ({m.d_model}) when model.head_dim is 0",
        )
    head_dim = m.head_dim or m.d_model // m.num_heads
    _check(head_dim % 2 == 0, "model.head_dim", head_dim, "must be even for RoPE")
    _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {', '.join(DTYPES)}")
    _check(m.remat in REMAT_MODES, "model.remat", m.remat, f"one of {', '.join(REMAT_MODES)}")
    _check(
        m.attention in ATTENTION_IMPLS,
        "model.attention",
        m.attention,
        f"one of {', '.join(ATTENTION_IMPLS)}",
    )
    _check(
        isinstance(m.get("attention_block", 0), int) and m.get("attention_block", 0) >= 0,
        "model.attention_block",
        m.get("attention_block", 0),
        "must be an integer >= 0 (0 means the whole sequence at once)",
    )
    _check(
        m.param_dtype in PARAM_DTYPES,
        "model.param_dtype",
        m.param_dtype,
        f"one of {', '.join(PARAM_DTYPES)}",
    )
    _check(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be > 0")
    _check(m.init_std > 0, "model.init_std", m.init_std, "must be > 0")
    r = m.rope
    _check(r.theta > 0, "model.rope.theta", r.theta, "must be > 0")
    _check(
        r.scaling in ROPE_SCALINGS,
        "model.rope.scaling",
        r.scaling,
        f"one of {', '.join(ROPE_SCALINGS)}",
    )
    if r.scaling != "none":
        _check(r.factor >= 1.0, "model.rope.factor", r.factor, "must be >= 1 when scaling is on")
    if r.scaling == "llama3":
        _check(
            0 < r.low_freq_factor < r.high_freq_factor,
            "model.rope.low_freq_factor",
            r.low_freq_factor,
            f"must be in (0, model.rope.high_freq_factor={r.high_freq_factor})",
        )
        _check(
            r.original_context >= 1,
            "model.rope.original_context",
            r.original_context,
            "must be >= 1",
        )
    e = m.moe
    _check(
        isinstance(e.num_experts, int) and e.num_experts >= 0,
        "model.moe.num_experts",
        e.num_experts,
        "must be >= 0 (0 means a dense model)",
    )
    if e.num_experts:
        _check(
            e.num_experts >= 2, "model.moe.num_experts", e.num_experts, "must be 0 (dense) or >= 2"
        )
        _check(
            1 <= e.top_k <= e.num_experts,
            "model.moe.top_k",
            e.top_k,
            f"must be between 1 and model.moe.num_experts ({e.num_experts})",
        )
        _check(
            e.router_temperature > 0,
            "model.moe.router_temperature",
            e.router_temperature,
            "must be > 0",
        )
        for k in ("aux_loss_coef", "z_loss_coef", "jitter"):
            _check(e[k] >= 0, f"model.moe.{k}", e[k], "must be >= 0")
        _check(
            e.grouped_matmul in GROUPED_MATMULS,
            "model.moe.grouped_matmul",
            e.grouped_matmul,
            f"one of {', '.join(GROUPED_MATMULS)}",
        )
        _check(e.block_size >= 8, "model.moe.block_size", e.block_size, "must be >= 8")
        _check(e.dispatch in DISPATCHES, "model.moe.dispatch", e.dispatch,
               f"one of {', '.join(DISPATCHES)}")  # fmt: skip
        _check(e.capacity_factor > 0, "model.moe.capacity_factor", e.capacity_factor,
               "must be > 0 (slots per expert = factor x tokens x top_k / experts)")  # fmt: skip

    _check(
        isinstance(d.seq_len, int) and d.seq_len >= 2,
        "data.seq_len",
        d.seq_len,
        "must be an integer >= 2",
    )
    _check(
        d.seq_len <= m.max_seq_len,
        "data.seq_len",
        d.seq_len,
        f"must be <= model.max_seq_len ({m.max_seq_len})",
    )
    _check_seq_len_schedule(d.seq_len_schedule, d.seq_len, t.steps)
    block = m.get("attention_block", 0)
    for length in [d.seq_len, *(pair[1] for pair in d.seq_len_schedule)]:
        _check(m.attention != "cudnn" or length % 2 == 0, "model.attention", m.attention,
               f"cuDNN trains a masked attention on even row lengths only (data.seq_len / "
               f"seq_len_schedule: {length}); use auto or xla")  # fmt: skip
        _check(
            block == 0 or length <= block or length % block == 0,
            "model.attention_block",
            block,
            f"must divide each row length longer than it (data.seq_len / seq_len_schedule: "
            f"{length}), or the whole {length} x {length} scores would be made at once",
        )
    _check(
        isinstance(d.sources, (list, tuple)) and len(d.sources) > 0,
        "data.sources",
        d.sources,
        "must be a non-empty list of {'path': ..., 'weight': ...}",
    )
    _check_sources(d.sources, "data.sources")
    _check(
        isinstance(d.eval_sources, (list, tuple)),
        "data.eval_sources",
        d.eval_sources,
        "must be a list of sources like data.sources (may be empty)",
    )
    _check_sources(d.eval_sources, "data.eval_sources")
    _check(isinstance(d.strict, bool), "data.strict", d.strict, "must be true or false")
    _check(d.packing in PACKING_MODES, "data.packing", d.packing,
           f"one of {', '.join(PACKING_MODES)}")  # fmt: skip
    _check(bool(d.tokenizer), "data.tokenizer", d.tokenizer, "path to a SentencePiece .model")

    _check(o.peak_lr > 0, "optimizer.peak_lr", o.peak_lr, "must be > 0")
    _check(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _check(
        0 <= o.warmup_fraction < 1,
        "optimizer.warmup_fraction",
        o.warmup_fraction,
        "must be in [0, 1)",
    )
    for k in ("b1", "b2"):
        _check(0 <= o[k] < 1, f"optimizer.{k}", o[k], "must be in [0, 1)")
    _check(o.eps > 0, "optimizer.eps", o.eps, "must be > 0")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip, "must be >= 0 (0 = no clipping)")
    _check(1 <= o.loss_scale <= MAX_LOSS_SCALE, "optimizer.loss_scale", o.loss_scale,
           "must be in [1, 2**24] (the float16 loss scale to start from)")  # fmt: skip
    _positive_ints(cfg, "optimizer", ("loss_scale_period",))

    _positive_ints(cfg, "train", ("steps", "batch_size", "log_every", "checkpoint_every"))
    _positive_ints(cfg, "train", ("keep_checkpoints", "grad_accum_steps"))
    _check(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps", t.grad_accum_steps,
           f"must divide train.batch_size ({t.batch_size})")  # fmt: skip
    _check(isinstance(t.seed, int), "train.seed", t.seed, "must be an integer")
    _check(isinstance(t.eval_every, int) and t.eval_every >= 0, "train.eval_every", t.eval_every,
           "must be an integer >= 0 (0 = no periodic evaluation)")  # fmt: skip
    _positive_ints(cfg, "train", ("eval_batches", "max_nonfinite_steps"))
    _check(isinstance(t.init_from, str), "train.init_from", t.init_from,
           "must be a path to another run's workdir or checkpoints/ (or '' for none)")  # fmt: skip
    _check(t.eval_every == 0 or len(d.eval_sources) > 0, "train.eval_every", t.eval_every,
           "needs data.eval_sources to evaluate on")  # fmt: skip
    _check(isinstance(t.sample_every, int) and t.sample_every >= 0, "train.sample_every",
           t.sample_every, "must be an integer >= 0 (0 = no sample generations)")  # fmt: skip
    _positive_ints(cfg, "train", ("sample_tokens",))
    prompts = list(t.sample_prompts)
    _check(all(isinstance(p, str) and p.strip() for p in prompts), "train.sample_prompts",
           prompts, "must be a list of non-empty strings")  # fmt: skip
    _check(t.sample_every == 0 or prompts, "train.sample_every", t.sample_every,
           "needs train.sample_prompts to generate from")  # fmt: skip
    _check(isinstance(t.sample_chat, bool), "train.sample_chat", t.sample_chat,
           "must be True or False")  # fmt: skip
    _check(isinstance(t.profile_steps, int) and t.profile_steps >= 0, "train.profile_steps",
           t.profile_steps, "must be an integer >= 0 (0 = no profile)")  # fmt: skip

    sizes = [cfg.mesh[a] for a in MESH_AXES]
    for a, v in zip(MESH_AXES, sizes, strict=True):
        _check(
            isinstance(v, int) and (v >= 1 or v == -1),
            f"mesh.{a}",
            v,
            "must be >= 1, or -1 for 'all remaining devices'",
        )
    _check(
        sizes.count(-1) <= 1,
        "mesh",
        dict(zip(MESH_AXES, sizes, strict=True)),
        "at most one axis may be -1",
    )
    fixed_batch = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.expert
    if fixed_batch > 0:
        _check(
            t.batch_size % fixed_batch == 0,
            "train.batch_size",
            t.batch_size,
            f"must be divisible by mesh.data * mesh.fsdp * mesh.expert ({fixed_batch})",
        )
    if e.num_experts and cfg.mesh.expert > 0:
        _check(
            e.num_experts % cfg.mesh.expert == 0,
            "mesh.expert",
            cfg.mesh.expert,
            f"must divide model.moe.num_experts ({e.num_experts})",
        )
    if cfg.mesh.tensor > 0:
        _check(
            m.num_kv_heads % cfg.mesh.tensor == 0,
            "mesh.tensor",
            cfg.mesh.tensor,
            f"must divide model.num_kv_heads ({m.num_kv_heads})",
        )


def phase_start(fraction: float, steps: int) -> int:
    """The first step of a `data.seq_len_schedule` phase that starts at `fraction` of `steps`."""
    # round first: 0.29 x 100 is 28.999999999999996 in floating point, and starts at 29
    return int(round(fraction * steps, 6))


def _check_seq_len_schedule(schedule, seq_len: int, steps) -> None:
    """`data.seq_len_schedule`: [(fraction of train.steps, length), ...] growing to seq_len."""
    key, shape = "data.seq_len_schedule", "a list of (fraction of train.steps, seq_len) pairs"
    _check(isinstance(schedule, (list, tuple)), key, schedule, f"must be {shape}, or []")
    if not schedule:
        return
    for i, pair in enumerate(schedule):
        _check(
            isinstance(pair, (list, tuple)) and len(pair) == 2
            and isinstance(pair[0], (int, float)) and isinstance(pair[1], int),
            f"{key}[{i}]", pair, "must be a (fraction, seq_len) pair like (0.5, 4096)",
        )  # fmt: skip
        fraction, length = pair
        _check(0 <= fraction < 1, f"{key}[{i}]", pair, "its fraction must be in [0, 1)")
        _check(
            length >= 2 and seq_len % length == 0, f"{key}[{i}]", pair,
            f"its seq_len must divide data.seq_len ({seq_len}), so that every batch keeps "
            "train.batch_size x data.seq_len tokens",
        )  # fmt: skip
        if i:
            before = schedule[i - 1]
            _check(fraction > before[0] and length > before[1], f"{key}[{i}]", pair,
                   f"fractions and lengths must both grow (after {tuple(before)})")  # fmt: skip
    _check(schedule[0][0] == 0, f"{key}[0]", schedule[0], "the first phase must start at 0.0")
    if isinstance(steps, int) and steps >= 1:  # else train.steps is named below
        for i in range(1, len(schedule)):
            start, before = (phase_start(schedule[j][0], steps) for j in (i, i - 1))
            _check(start > before, f"{key}[{i}]", schedule[i],
                   f"starts at step {start} of train.steps={steps}, as the phase before it does: "
                   "that phase would get no step")  # fmt: skip
    _check(
        schedule[-1][1] == seq_len,
        key,
        schedule,
        f"the last phase's seq_len must be data.seq_len ({seq_len}), the length it grows to",
    )


def _check_sources(sources, field: str) -> None:
    for i, src in enumerate(sources):
        _check(
            isinstance(src, dict) and isinstance(src.get("path"), str),
            f"{field}[{i}]",
            src,
            "must be a dict with a string 'path'",
        )
        extra = set(src) - set(SOURCE_KEYS)
        _check(
            not extra,
            f"{field}[{i}]",
            src,
            f"unknown keys {sorted(extra)}; valid: {', '.join(SOURCE_KEYS)}",
        )
        limit = src.get("max_examples", 0)
        _check(
            isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0,
            f"{field}[{i}].max_examples",
            limit,
            "must be an integer >= 0 (0 = all)",
        )
        fmap = src.get("field_map", {})
        _check(
            isinstance(fmap, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in fmap.items()),
            f"{field}[{i}].field_map",
            fmap,
            "must map our field names to the row's, e.g. {'instruction': 'question'}",
        )
        weight = src.get("weight", 1.0)
        _check(
            isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
            f"{field}[{i}].weight",
            weight,
            "must be a number > 0",
        )
        fmt = src.get("format", "lines")
        _check(
            fmt in TEXT_FORMATS, f"{field}[{i}].format", fmt, f"one of {', '.join(TEXT_FORMATS)}"
        )
        path = src["path"]
        if path.startswith("tfds:"):
            _check(":" in path[5:], f"{field}[{i}].path", path, "tfds:NAME[/CONFIG]:SPLIT")
        if path.startswith(("hf:", "tfds:")):
            _check(len(path.split(":")[1]) > 0, f"{field}[{i}].path", path, "names no dataset")
        _check("data_dir" not in src or path.startswith("tfds:"), f"{field}[{i}].data_dir",
               src.get("data_dir"), "only for tfds: sources")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10_000.0
    scaling: str = "none"
    factor: float = 1.0
    original_context: int = 4096
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    num_experts: int = 0
    top_k: int = 2
    router_temperature: float = 1.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    jitter: float = 0.0
    grouped_matmul: str = "blocked"
    block_size: int = 1024
    dispatch: str = "dropless"
    capacity_factor: float = 1.25


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture, frozen: what `model.Transformer` is built from."""

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden: int
    max_seq_len: int
    head_dim: int = 0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    attention_block: int = 0
    rope: RopeConfig = RopeConfig()
    moe: MoeConfig = MoeConfig()

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict) -> ModelConfig:
        raw = model_cfg.to_dict()
        rope = RopeConfig(**raw.pop("rope"))
        moe = MoeConfig(**raw.pop("moe"))
        return cls(**raw, rope=rope, moe=moe)
