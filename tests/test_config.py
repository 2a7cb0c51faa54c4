import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hanuman_jax.config import (
    SECTIONS,
    ConfigError,
    ModelConfig,
    check_batch_divides,
    load_config,
    validate,
)
from hanuman_jax.config.fields import (
    FINITE,
    FLAG,
    Flag,
    Int,
    Number,
    OneOf,
    Section,
    Text,
    above,
    at_least,
    within,
)
from hanuman_jax.model.build import count_params, train_flops_per_token
from hanuman_jax.train import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_locked_and_commented(path):
    cfg = load_config(path)
    assert cfg.is_locked
    for key in (
        "train.steps",
        "train.batch_size",
        "train.seed",
        "train.log_every",
        "train.checkpoint_every",
        "data.seq_len",
        "model.dtype",
        "model.param_dtype",
        "model.moe.num_experts",
        "model.moe.top_k",
        "model.moe.router_temperature",
        "model.moe.aux_loss_coef",
        "model.moe.z_loss_coef",
        "mesh.data",
        "mesh.fsdp",
        "mesh.expert",
        "mesh.tensor",
    ):
        node = cfg
        for part in key.split("."):
            node = node[part]
    # every assignment line carries a comment
    for line in path.read_text().splitlines():
        if line.strip().startswith("cfg.") and "ConfigDict()" not in line and "lock()" not in line:
            assert "#" in line, f"{path.name}: uncommented field: {line.strip()}"


def test_recipe_config_is_the_recipe():
    cfg = load_config(ROOT / "configs" / "hanuman_1b_moe.py")
    m = cfg.model
    assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads) == (24, 896, 14, 2)
    assert (m.ffn_hidden, m.max_seq_len, m.vocab_size) == (2560, 8192, 96_000)
    assert (m.moe.num_experts, m.moe.top_k, m.moe.router_temperature) == (8, 2, 1.2)
    assert m.moe.aux_loss_coef == 0.01 and m.dtype == "bfloat16" and m.rope.scaling != "none"
    o = cfg.optimizer
    assert (o.b1, o.b2, o.weight_decay, o.peak_lr, o.warmup_fraction) == (
        0.9,
        0.95,
        0.1,
        3e-4,
        0.02,
    )


def test_recipe_parameter_counts_match_hand_count(capsys, monkeypatch):
    d, layers, vocab, experts, top_k, hidden = 896, 24, 96_000, 8, 2, 2560
    head_dim, kv = d // 14, 2
    attention = 2 * d * d + 2 * d * kv * head_dim  # q, o; k, v
    expert = 3 * d * hidden  # gate, up, down
    per_layer_fixed = attention + d * experts + 2 * d  # + router + two RMSNorm scales
    total = layers * (per_layer_fixed + experts * expert) + vocab * d + d  # tied head, final norm
    active = layers * (per_layer_fixed + top_k * expert) + vocab * d + d
    assert (total, active) == (1_451_477_888, 460_573_568)

    # main() may set XLA_FLAGS for the process; a backend started later in this test worker would
    # read them (tests/test_memory.py compares with XLA's default scheduler)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    assert main(["--config", str(ROOT / "configs" / "hanuman_1b_moe.py"), "--dry_run"]) == 0
    assert (
        "concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]
    )  # a dry run compiles nothing
    out = capsys.readouterr().out
    assert f"total parameters:  {total:,}" in out
    assert f"active parameters: {active:,} per token" in out

    model_cfg = ModelConfig.from_config(load_config(ROOT / "configs" / "hanuman_1b_moe.py").model)
    assert count_params(model_cfg) == {"total": total, "active": active, "embedding": vocab * d}
    flops = train_flops_per_token(model_cfg, 8192)
    assert flops == 6 * (active - 2 * layers * d - d) + 12 * layers * 14 * head_dim * 8192
    # the recipe's progressive length: a quarter of the steps at 2048, a quarter at 4096
    steps, tokens = 152_600, 64 * 8192
    run = sum(n * tokens * train_flops_per_token(model_cfg, length)
              for n, length in ((38_150, 2048), (38_150, 4096), (76_300, 8192)))  # fmt: skip
    assert "steps 38,150-76,299: rows of 4096 tokens" in out
    assert f"{steps * tokens:.4g} tokens, {run:.4g} FLOPs" in out


BAD = [
    ("--config.model.moe.topk=3", "model.moe.topk does not exist"),
    ("--config.train.steps=ten", "train.steps='ten': expected an integer"),
    ("--config.model.moe.top_k=5", "model.moe.top_k=5 is invalid"),
    ("--config.model.num_kv_heads=3", "model.num_kv_heads=3 is invalid: must divide"),
    ("--config.data.seq_len=4096", "data.seq_len=4096 is invalid: must be <= model.max_seq_len"),
    ("--config.model.dtype=fp8", "model.dtype='fp8' is invalid: one of float32"),
    ("--config.mesh.fsdp=-1", "at most one axis may be -1"),
    ("--config.train.batch_size=0", "train.batch_size=0 is invalid"),
    # past int32 (the optimizer's step count, token ids): once a traceback in the first step
    ("--config.train.steps=3000000000", "steps=3000000000 is invalid: must be an integer >= 1 and"),
    ("--config.model.vocab_size=3000000000", "vocab_size=3000000000 is invalid: must be an"),
    ("--config.model.rope.scaling=yarn", "model.rope.scaling='yarn' is invalid"),
    ("--config.data.sources=[{'pth': 'x'}]", "data.sources[0]"),
    ("--config.model=3", "config model is a section"),
    (
        "--config.data.seq_len_schedule=[(0, 48), (0.5, 128)]",
        "[0]=(0, 48) is invalid: its seq_len must divide data.seq_len (128)",
    ),
    ("--config.data.seq_len_schedule=[(0, 32), (1.0, 128)]", "its fraction must be in [0, 1)"),
    ("--config.data.seq_len_schedule=[(0.1, 64), (0.5, 128)]", "the first phase must start at 0"),
    (
        "--config.data.seq_len_schedule=[(0, 32), (0.5, 64)]",
        "the last phase's seq_len must be data.seq_len (128)",
    ),
    ("--config.data.seq_len_schedule=[(0, 64), (0.5, 32), (0.7, 128)]", "must both grow"),
    ("--config.data.seq_len_schedule=[64, 128]", "must be a (fraction, seq_len) pair"),
    ("--config.data.seq_len_schedule=2048", "expected a list"),
    ("--config.model.attention_block=48", "model.attention_block=48 is invalid: must divide"),
    ("--config.model.attention_block=-1", "model.attention_block=-1 is invalid"),
    (
        "--config.data.seq_len_schedule=[(0, 32), (0.001, 128)]",
        "[1]=(0.001, 128) is invalid: starts at step 0 of train.steps=300, as the phase before",
    ),
    ("--config.optimizer.peak_lr=inf", "optimizer.peak_lr=inf is invalid: must be a finite"),
    ("--config.model.norm_eps=nan", "model.norm_eps=nan is invalid: must be a finite number"),
    ("--config.optimizer.loss_scale=1e30", "optimizer.loss_scale=1e+30 is invalid: must be in"),
]


def test_cudnn_attention_needs_even_rows():
    with pytest.raises(ConfigError, match="model.attention='cudnn' is invalid: cuDNN trains a"):
        load_config(ROOT / "configs" / "tiny.py",
                    ["--config.model.attention=cudnn", "--config.data.seq_len=127"])  # fmt: skip
    load_config(ROOT / "configs" / "tiny.py", ["--config.data.seq_len=127"])  # auto: XLA there


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(ROOT / "configs" / "tiny.py", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_bad_value_is_one_line_before_compiling():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hanuman_jax.train",
            "--config",
            "configs/tiny.py",
            "--config.model.moe.top_k=7",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: config model.moe.top_k=7 is invalid: must be between 1 and "
        "model.moe.num_experts (4)"
    ]


def test_overrides_convert_types():
    cfg = load_config(
        ROOT / "configs" / "tiny.py",
        [
            "--config.train.steps=7",
            "--config.optimizer.peak_lr=1e-3",
            "--config.model.tie_embeddings=false",
            "--config.mesh.data=1",
            "--config.data.sources=[{'path': 'a.txt', 'weight': 2}]",
        ],
    )
    assert cfg.train.steps == 7 and cfg.optimizer.peak_lr == 1e-3
    assert cfg.model.tie_embeddings is False
    assert cfg.data.sources == [{"path": "a.txt", "weight": 2}]


def test_source_options_are_checked():
    tiny = ROOT / "configs" / "tiny.py"
    ok = "[{'path': 'a.jsonl', 'max_examples': 10, 'field_map': {'text': 'body'}}]"
    assert load_config(tiny, [f"--config.data.sources={ok}"]).data.sources[0]["max_examples"] == 10
    for bad, message in [
        ("[{'path': 'a', 'max_examples': -1}]", "data.sources[0].max_examples=-1 is invalid"),
        ("[{'path': 'a', 'field_map': ['x']}]", "data.sources[0].field_map=['x'] is invalid"),
        ("[{'path': 'a', 'sample': 3}]", "unknown keys ['sample']; valid: path, weight"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(tiny, [f"--config.data.sources={bad}"])
        assert message in str(err.value)


def test_stages_b_and_c_keep_their_parents_model_and_start_from_its_run():
    pairs = [
        ("hanuman_1b_moe", "stage_b_thai_lapt", "runs/hanuman_1b_moe"),
        ("hanuman_1b_moe", "stage_c_sft", "runs/stage_b_thai_lapt"),
        ("tiny", "tiny_stage_b", "runs/tiny"),
        ("tiny", "tiny_stage_c", "runs/tiny_stage_b"),
    ]
    for parent, stage, init_from in pairs:
        a, b = (load_config(ROOT / "configs" / f"{n}.py") for n in (parent, stage))
        assert b.model.to_dict() == a.model.to_dict() and b.train.init_from == init_from
        assert b.optimizer.peak_lr < a.optimizer.peak_lr
    assert load_config(ROOT / "configs" / "stage_c_sft.py").data.packing == "whole"
    with pytest.raises(ConfigError, match=r"train.max_nonfinite_steps=0 is invalid: must be an"):
        load_config(ROOT / "configs" / "tiny.py", ["--config.train.max_nonfinite_steps=0"])


def test_tiny_presets_evaluate_on_a_held_out_split_that_nothing_trains_on():
    sample = ROOT / "hanuman_jax" / "assets" / "sample"
    held_out = {p.relative_to(sample) for p in (sample / "heldout").iterdir()}
    for path in CONFIGS:
        sources = [s["path"] for s in load_config(path).data.sources]
        assert not [s for s in sources if "heldout" in s], path.name
    for name, steps in (("tiny", 300), ("tiny_stage_b", 100), ("tiny_stage_c", 60)):
        cfg = load_config(ROOT / "configs" / f"{name}.py")
        evaluated = {Path(s["path"].removeprefix("bundled:")) for s in cfg.data.eval_sources}
        assert evaluated and evaluated <= held_out, name
        assert cfg.train.steps == steps and steps // cfg.train.eval_every >= 3, name
    stage_c = load_config(ROOT / "configs" / "tiny_stage_c.py").train
    assert stage_c.sample_every > 0 and stage_c.sample_chat and stage_c.sample_prompts
    # written apart from the training text: no held-out line is one of its lines
    trained = set()
    for p in sample.rglob("*"):
        if p.suffix in (".txt", ".jsonl") and "heldout" not in p.parts:
            trained |= set(p.read_text("utf-8").splitlines())
    for p in held_out:
        assert not set((sample / p).read_text("utf-8").splitlines()) & trained, p


def _sections():
    """The typed sections of tiny.py, model.rope and model.moe included."""
    cfg = load_config(ROOT / "configs" / "tiny.py")
    typed = {name: section.from_config(cfg[name]) for name, section in SECTIONS.items()}
    return [*typed.values(), typed["model"].rope, typed["model"].moe]


def _fields():
    return [
        pytest.param(section, f.name, id=f"{section.PREFIX}.{f.name}")
        for section in _sections()
        for f in dataclasses.fields(section)
        if not isinstance(getattr(section, f.name), Section)
    ]


@pytest.mark.parametrize("section,name", _fields())
def test_every_field_of_every_section_is_checked(section, name):
    value = getattr(section, name)
    wrong = "yes" if isinstance(value, bool) else "7" if isinstance(value, (int, float)) else 7
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(section, **{name: wrong})
    assert str(err.value).startswith(f"config {section.PREFIX}.{name}={wrong!r} is invalid: ")


def _table_entries():
    return [
        pytest.param(section, name, rule, id=f"{section.PREFIX}.{name}")
        for section in _sections()
        for name, rule in section.RULES.items()
    ]


@pytest.mark.parametrize("section,name,rule", _table_entries())
def test_each_table_entry_holds_its_bounds(section, name, rule):
    bad = []  # (value, what the message says is valid)
    if isinstance(rule, Int) and rule.lo is not None:
        bad = [(rule.lo - 1, f"must be an integer >= {rule.lo}"), (1.5, "must be an integer")]
        if rule.hi is not None:
            bad.append((rule.hi + 1, f"must be an integer >= {rule.lo} and <= {rule.hi}"))
    elif isinstance(rule, Number):
        bad = [(math.nan, "must be a finite number"), (math.inf, "must be a finite number")]
        if math.isfinite(rule.lo):
            bad.append((rule.lo if rule.lo_open else rule.lo - 1, rule.valid()))
        if math.isfinite(rule.hi):
            bad.append((rule.hi if rule.hi_open else rule.hi + 1, rule.valid()))
    elif isinstance(rule, OneOf):
        bad = [("bogus", f"one of {', '.join(rule.choices)}")]
    elif isinstance(rule, Flag):
        bad = [(1, "must be true or false")]
    elif isinstance(rule, Text) and not rule.empty_ok:
        bad = [("", rule.valid)]
    for value, valid in bad:
        with pytest.raises(ConfigError) as err:
            dataclasses.replace(section, **{name: value})
        assert f"config {section.PREFIX}.{name}={value!r} is invalid: {valid}" in str(err.value)


def test_rules_say_what_is_valid():
    assert (Int(1).problem(1), Int(1).problem(0)) == (None, "must be an integer >= 1")
    assert Int(1).problem(True) == "must be an integer >= 1"
    assert Int(0, "0 = off").problem(-1) == "must be an integer >= 0 (0 = off)"
    assert Int(None).problem(-5) is None and Int(None).problem("5") == "must be an integer"
    assert Int(None, hi=9).problem(10) == "must be an integer <= 9"
    assert Int(1, "x", hi=9).problem(10) == "must be an integer >= 1 and <= 9 (x)"
    assert Int(1, hi=9).problem(9) is None
    assert (above(0).problem(0), above(0).problem(1e-9)) == ("must be > 0", None)
    assert (at_least(0).problem(0), at_least(0).problem(-1)) == (None, "must be >= 0")
    assert within(0, 1, hi_open=True).problem(1) == "must be in [0, 1)"
    assert within(0, 1).problem(1) is None and within(0, 1).problem(1.5) == "must be in [0, 1]"
    assert within(1, 2.0**24).valid() == "must be in [1, 16777216]"
    assert FINITE.problem(-1e300) is None and FINITE.problem("x") == "must be a number"
    assert OneOf(("a", "b")).problem("c") == "one of a, b" and FLAG.problem(0) is not None
    assert Text("a path").problem("") == "a path" and Text("", empty_ok=True).problem("") is None


BAD_ACROSS = [
    (
        ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.train.batch_size=6"],
        "config train.batch_size=6 is invalid: it is split 4 ways by mesh.data=1 x mesh.fsdp=4 x "
        "mesh.expert=1; use a multiple of 4",
    ),
    (  # a -1 axis only multiplies the ways the others set
        ["--config.mesh.fsdp=4", "--config.train.batch_size=6"],
        "train.batch_size=6 is invalid: it is split 4 ways by mesh.fsdp=4 x mesh.expert=1",
    ),
    (
        [
            "--config.mesh.fsdp=2",
            "--config.train.batch_size=6",
            "--config.train.grad_accum_steps=2",
        ],
        "config train.grad_accum_steps=2 is invalid: must divide the 3 rows of each of the 2 batch "
        "shards (mesh.fsdp=2 x mesh.expert=1); use a train.batch_size that is a multiple of 4",
    ),
    (
        ["--config.train.batch_size=6", "--config.train.grad_accum_steps=4"],
        "config train.grad_accum_steps=4 is invalid: must divide train.batch_size (6); use a "
        "train.batch_size that is a multiple of 4",
    ),
    (
        ["--config.mesh.expert=3", "--config.train.batch_size=24"],
        "config mesh.expert=3 is invalid: must divide model.moe.num_experts (4)",
    ),
    (["--config.mesh.tensor=4"], "config mesh.tensor=4 is invalid: must divide model.num_kv_heads"),
    (["--config.mesh.data=0"], "config mesh.data=0 is invalid: must be >= 1, or -1 for 'all"),
    (
        ["--config.train.eval_every=5", "--config.data.eval_sources=[]"],
        "train.eval_every=5 is invalid: needs data.eval_sources",
    ),
    (["--config.train.sample_every=5", "--config.train.sample_prompts=[]"], "needs train.sample_"),
    (["--config.data.sources=[{'path': 'a', 'weight': float('inf')}]"], "expected a Python"),
    (
        ["--config.data.sources=[{'path': 'a', 'weight': 1e999}]"],
        "weight=inf is invalid: must be a",
    ),
    (["--config.model.rope.scaling=linear", "--config.model.rope.factor=0.5"], "factor=0.5 is inv"),
    (["--config.model.moe.num_experts=1"], "model.moe.num_experts=1 is invalid: must be 0 (dense)"),
    (["--config.model.head_dim=7"], "config model.head_dim=7 is invalid: must be even for RoPE"),
]


@pytest.mark.parametrize("overrides,message", BAD_ACROSS, ids=[" ".join(b[0]) for b in BAD_ACROSS])
def test_rules_across_fields_and_sections(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "tiny.py", overrides)
    assert message in str(err.value)


def test_batch_split_is_one_rule_where_the_splitters_are_known():
    from hanuman_jax.data import make_dataset
    from hanuman_jax.planning import memory

    cfg = load_config(ROOT / "configs" / "tiny.py")  # 16 rows, mesh.data=-1
    with pytest.raises(ConfigError, match=r"=16 is invalid: it is split 3 ways by the 3 processes"):
        make_dataset(cfg, "unused.model", process_count=3)
    with pytest.raises(
        ConfigError, match=r"=16 is invalid: it is split 3 ways by the mesh \{'data"
    ):
        memory.plan(cfg, 3)
    check_batch_divides(12, 2, 3, "anything")  # 3 shards of 4 rows, 2 micro-batches each


CONFIG_FILES = [  # (file name, its text, what the one line says after "--config FILE")
    ("cfg.json", '{"model": {}}', ": not a Python file; a config is a .py file that defines"),
    ("notes.txt", "hello", ": not a Python file"),
    ("broken.py", "import ml_collections\ndef get_config(:\n", ":2: SyntaxError: invalid syntax"),
    ("empty.py", "x = 1\n", ": the file defines no get_config()"),
    ("typo.py", "def get_config():\n\n    return ConfigDct()\n", ":3: NameError: name 'ConfigDct'"),
]


@pytest.mark.parametrize(("name", "text", "says"), CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_config_file_that_is_not_a_config_is_one_line(tmp_path, monkeypatch, capsys, name, text,
                                                      says):  # fmt: skip
    (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)  # a relative path, as typed
    with pytest.raises(ConfigError) as err:
        load_config(name)
    assert str(err.value).startswith(f"--config {name}{says}"), err.value
    assert main(["--config", name]) == 2
    assert capsys.readouterr().err == f"error: {err.value}\n"


def test_sections_refuse_unknown_and_missing_keys():
    cfg = load_config(ROOT / "configs" / "tiny.py")
    with cfg.unlocked():
        cfg.train.warmup_steps = 10
    with pytest.raises(ConfigError, match=r"config train.warmup_steps is not a known key; valid"):
        validate(cfg)
    cfg = load_config(ROOT / "configs" / "tiny.py")
    with cfg.unlocked():
        del cfg.mesh["tensor"]
    with pytest.raises(ConfigError, match=r"config mesh.tensor is missing"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"config model.moe.experts is not a known key"):
        ModelConfig.from_config({**load_config(ROOT / "configs" / "tiny.py").model.to_dict(),
                                 "moe": {"experts": 4}})  # fmt: skip


def test_config_imports_no_jax_and_data_may_be_imported_first():
    for first in ("hanuman_jax.data.schedule", "hanuman_jax.data.sources", "hanuman_jax.config"):
        code = f"import sys, {first}, hanuman_jax.config; assert 'jax' not in sys.modules"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
