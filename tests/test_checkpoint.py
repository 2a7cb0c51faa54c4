"""Checkpoints in process: damaged steps, mismatched checkpoints, non-finite runs, bad workdirs."""

import dataclasses
import importlib.util
import json
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import random_params, small_model_cfg

from hanuman_jax import __version__, sharding
from hanuman_jax.checkpoint.files import MANIFEST, CheckpointError, damage, seal
from hanuman_jax.checkpoint.manager import Checkpointer, check_resumable
from hanuman_jax.checkpoint.restore import load_params
from hanuman_jax.config import ConfigError, load_config
from hanuman_jax.hf.importer import write_checkpoint
from hanuman_jax.model.build import abstract_params
from hanuman_jax.training.loop import NonFiniteError, train
from hanuman_jax.training.step import build_setup, init_state

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--config.model.num_layers=2", "--config.model.d_model=64", "--config.data.seq_len=64",
         "--config.train.batch_size=4", "--config.train.log_every=1",
         "--config.train.eval_every=0")  # fmt: skip
TOKENIZER = ROOT / "hanuman_jax" / "assets" / "sample" / "tokenizer.model"


def _cfg(*extra, config="tiny.py"):
    return load_config(ROOT / "configs" / config, [*SMALL, *extra])


def _steps(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


pytestmark = pytest.mark.usefixtures("shared_compile_cache")  # runs share compilations


def test_a_damaged_checkpoint_is_named_and_the_one_before_restored(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hanuman_jax")
    run = tmp_path / "run"
    cfg = ("--config.train.steps=6", "--config.train.checkpoint_every=2",
           "--config.train.keep_checkpoints=3")  # fmt: skip
    train(_cfg(*cfg), run, progress=False)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "6"]
    for step in ("2", "4", "6"):
        assert damage(ckpts / step) is None
        assert (
            ckpts / step / "tokenizer" / "tokenizer.model"
        ).read_bytes() == TOKENIZER.read_bytes()
    meta = json.loads((ckpts / "6" / "meta" / "metadata").read_text())
    assert meta["version"] == __version__ and meta["parameters"]["total"] == 680_768
    assert meta["config"]["train"]["steps"] == 6 and meta["tokenizer"]["vocab_size"] == 4096

    (ckpts / "8.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # a save killed half way
    shard = next(p for p in (ckpts / "6" / "state").rglob("*") if p.parent.name == "d")
    with open(shard, "r+b") as f:
        f.truncate(5)
    # export, generate and evaluate read parameters through load_params: it skips the step too
    assert load_params(run).step == 4
    with pytest.raises(ConfigError, match=f"checkpoint {ckpts / '6'} is damaged: state/"):
        load_params(run, 6)
    train(_cfg(*cfg), run, progress=False)
    assert f"checkpoint {ckpts / '6'} is damaged (state/" in caplog.text
    assert f"resumed from {ckpts / '4'} at step 4" in caplog.text
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "6", "6.damaged"]
    assert _steps(run) == [1, 2, 3, 4, 5, 6]  # each step once: 5 and 6 were redone

    (ckpts / "6" / "meta" / "metadata").unlink()
    (ckpts / "4" / "tokenizer" / "tokenizer.model").write_bytes(b"")
    next((ckpts / "2" / "data").iterdir()).unlink()
    with pytest.raises(CheckpointError, match="holds checkpoints but none is whole") as error:
        train(_cfg(*cfg), run, progress=False)
    assert "step 6: meta/metadata is missing; step 4: tokenizer/tokenizer.model has 0" in str(
        error.value
    )
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "6", "6.damaged"]  # none moved


def _imported_run(tmp_path, steps=(1, 2)):
    """A params-only run as `import_hf` writes it, with the sample tokenizer copied in."""
    cfg = small_model_cfg()
    for step in steps:
        write_checkpoint(random_params(cfg, seed=step), cfg, tmp_path / "run", step=step,
                         tokenizer=TOKENIZER)  # fmt: skip
    return tmp_path / "run" / "checkpoints"


def _fault_checks():
    """scripts/fault_checks.py, whose fault setups these tests share with the fault sweep."""
    spec = importlib.util.spec_from_file_location(
        "fault_checks", ROOT / "scripts" / "fault_checks.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


FAULTS = _fault_checks()


def _truncate_state(step_dir: Path) -> None:
    with open(FAULTS.largest_data_file(step_dir), "r+b") as f:
        f.truncate(5)


def _flip_state(step_dir: Path) -> None:
    shard = FAULTS.largest_data_file(step_dir)
    size = shard.stat().st_size
    FAULTS.flip(step_dir)
    assert shard.stat().st_size == size


def _edit_meta(step_dir: Path, edit, *, reseal: bool) -> None:
    """Rewrites the step's metadata with `edit(text)`; `reseal`: and its manifest, as someone who
    meant the edit would (else the manifest tells the edit)."""
    meta_file = step_dir / "meta" / "metadata"
    meta_file.write_text(edit(meta_file.read_text()))
    if reseal:
        seal(step_dir, None)


def _damaged_warnings(caplog) -> list[str]:
    found = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    caplog.clear()
    return found


class _Checked(Exception):
    pass


@pytest.mark.parametrize("damage_state, why", [
    (_truncate_state, "has 5 bytes"),
    (_flip_state, "was changed after it was written"),  # the size is the same: the hash tells
])  # fmt: skip
def test_resume_and_load_params_skip_a_damaged_step_alike(tmp_path, caplog, damage_state, why):
    """Training's resume and load_params find the newest whole step by the same walk: one
    warning, word for word the same, for the damaged step, then the one before is opened."""
    caplog.set_level(logging.WARNING, logger="hanuman_jax")
    ckpts = _imported_run(tmp_path)
    shard = FAULTS.largest_data_file(ckpts / "2").relative_to(ckpts / "2")
    damage_state(ckpts / "2")
    assert load_params(ckpts.parent).step == 1
    by_load = _damaged_warnings(caplog)
    assert len(by_load) == 1 and by_load[0].startswith(
        f"checkpoint {ckpts / '2'} is damaged ({shard} {why}"
    )
    with pytest.raises(ConfigError, match=f"{ckpts / '2'} is damaged: {shard} {why}.*; step 1 "
                       "before it is whole"):  # fmt: skip
        load_params(ckpts.parent, 2)

    opened = []

    def check(meta, step_dir):  # stops the resume before it restores a train state
        opened.append((meta["config"]["model"]["d_model"], step_dir))
        raise _Checked

    ckpt = Checkpointer(ckpts, keep=3)
    try:
        with pytest.raises(_Checked):
            ckpt.restore_newest(None, None, check)
    finally:
        ckpt.close()
    assert opened == [(48, ckpts / "1")] and _damaged_warnings(caplog) == by_load

    # metadata that reads as no JSON (its manifest rewritten, so that it passes) is damage too
    _edit_meta(ckpts / "1", lambda text: "x" * len(text), reseal=True)
    with pytest.raises(ConfigError, match=rf"holds no whole checkpoint \(step 2: {shard} {why}.*; "
                       r"step 1: meta/metadata is not valid JSON"):  # fmt: skip
        load_params(ckpts.parent)
    assert "damaged (meta/metadata is not valid JSON " in _damaged_warnings(caplog)[1]
    with pytest.raises(ConfigError, match=f"{ckpts / '1'} is damaged: meta/metadata is not valid"):
        load_params(ckpts.parent, 1)


def test_an_imported_checkpoint_is_sealed_and_checked_as_a_trained_one(tmp_path):
    ckpts = _imported_run(tmp_path, steps=(0,))
    step_dir = ckpts / "0"
    assert damage(step_dir) is None
    listed = json.loads((step_dir / MANIFEST).read_text())["files"]
    assert {"meta/metadata", "tokenizer/tokenizer.model"} <= set(listed)
    assert any(name.startswith("state/") for name in listed)
    loaded = load_params(ckpts.parent)
    assert loaded.tokenizer == step_dir / "tokenizer" / "tokenizer.model"
    assert loaded.meta["tokenizer"]["vocab_size"] == 4096
    (step_dir / "tokenizer" / "tokenizer.model").write_bytes(b"")
    assert damage(step_dir) == (
        f"tokenizer/tokenizer.model has 0 bytes, {TOKENIZER.stat().st_size} were written"
    )
    with pytest.raises(ConfigError, match="is damaged: tokenizer/tokenizer.model has 0 bytes"):
        load_params(ckpts.parent, 0)


def test_training_hashes_its_checkpoint_files_in_the_background_save(tmp_path, monkeypatch):
    import threading

    import hanuman_jax.checkpoint.files as files_module

    hashed_by, real = [], files_module.file_sha256

    def sha256(path):
        hashed_by.append(threading.current_thread())
        return real(path)

    monkeypatch.setattr(files_module, "file_sha256", sha256)
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, tokenizer=TOKENIZER)
    try:
        ckpt.save(3, {"params": {"w": np.ones((5, 3), np.float32)}}, {"i": 3}, {"config": {}})
        ckpt.wait()
    finally:
        ckpt.close()
    listed = json.loads((tmp_path / "checkpoints" / "3" / MANIFEST).read_text())["files"]
    assert listed["tokenizer/tokenizer.model"]["sha256"] == real(TOKENIZER)
    assert all(len(record["sha256"]) == 64 for record in listed.values())
    assert len(hashed_by) >= len(listed) and threading.main_thread() not in hashed_by


def test_a_size_only_manifest_still_loads_and_hashes_are_checked_where_present(tmp_path):
    """Steps sealed before the manifest kept hashes record a size per file."""
    step_dir = _imported_run(tmp_path, steps=(0,)) / "0"
    manifest_file = step_dir / MANIFEST
    listed = json.loads(manifest_file.read_text())["files"]
    sizes = {name: record["size"] for name, record in listed.items()}
    manifest_file.write_text(json.dumps({"files": sizes}))
    assert damage(step_dir) is None and load_params(step_dir.parents[1]).step == 0
    sizes["meta/metadata"] = listed["meta/metadata"]  # this one file's hash is known
    manifest_file.write_text(json.dumps({"files": sizes}))
    assert damage(step_dir) is None
    _edit_meta(step_dir, lambda text: text.replace('"d_model": 48', '"d_model": 49'), reseal=False)
    assert damage(step_dir) == (
        f"meta/metadata was changed after it was written (its sha256 is not the one in {MANIFEST})"
    )


def test_metadata_that_does_not_describe_the_saved_arrays_is_refused(tmp_path):
    """An edited meta/metadata (the same size) must not restore a part of the model, or one of
    another shape: partial_restore reads what the metadata names and nothing tells the rest."""
    cfg = small_model_cfg(num_layers=3)
    step_dir = write_checkpoint(random_params(cfg), cfg, tmp_path / "run", step=5)

    def layers(then, now, ffn=40):
        return lambda text: text.replace(f'"num_layers": {then}', f'"num_layers": {now}').replace(
            '"ffn_hidden": 40', f'"ffn_hidden": {ffn}'
        )

    _edit_meta(step_dir, layers(3, 2), reseal=False)  # the manifest's hash tells the edit
    with pytest.raises(CheckpointError, match=f"{step_dir} is damaged: meta/metadata was changed"):
        load_params(tmp_path / "run", 5)
    seal(step_dir, None)  # and when the manifest was rewritten too, the arrays tell it
    with pytest.raises(CheckpointError, match=rf"^checkpoint {step_dir} is damaged: state holds "
                       r"params\.layers\.2\.attn\.wk \(48, 2, 8\), which the model in "
                       r"meta/metadata does not have$"):  # fmt: skip
        load_params(tmp_path / "run", 5)
    _edit_meta(step_dir, layers(2, 4), reseal=True)
    with pytest.raises(CheckpointError, match=r"model in meta/metadata has params\.layers\.3\.attn"
                       r"\.wk \(48, 2, 8\), which state does not hold"):  # fmt: skip
        load_params(tmp_path / "run", 5)
    _edit_meta(step_dir, layers(4, 3, ffn=48), reseal=True)
    with pytest.raises(CheckpointError, match=r"model in meta/metadata has params\.layers\.0\.moe"
                       r"\.w_down \(5, 48, 48\), state holds \(5, 40, 48\)"):  # fmt: skip
        load_params(tmp_path / "run", 5)

    # training's resume checks its whole train state the same way before it restores
    ckpt = Checkpointer(step_dir.parent, keep=3)
    bigger = abstract_params(dataclasses.replace(cfg, ffn_hidden=48))
    try:
        with pytest.raises(
            CheckpointError,
            match=r"none is whole \(step 5: the model in meta"
            r"/metadata has params\.layers\.0\.moe\.w_down \(5, 48, 48\)",
        ):
            ckpt.restore_newest({"params": bigger}, None, lambda meta, where: None)
    finally:
        ckpt.close()


def test_a_checkpoint_of_another_model_or_tokenizer_is_refused(tmp_path):
    cfg = _cfg("--config.model.vocab_size=4096")
    tokenizer = {"file": "tokenizer.model", "vocab_size": 4096, "sha256": "aa"}
    meta = {"config": cfg.to_dict(), "tokenizer": tokenizer}
    check_resumable(cfg, meta, tmp_path, "aa")
    with pytest.raises(CheckpointError, match=r"another tokenizer \(tokenizer.model, 4096 pie"):
        check_resumable(cfg, meta, tmp_path, "bb")
    other = _cfg("--config.model.vocab_size=5000")
    with pytest.raises(CheckpointError, match=r"model \(model.vocab_size=4096 there, 5000 now\)"):
        check_resumable(other, meta, tmp_path, "aa")


def test_nonfinite_steps_in_a_row_save_and_stop(tmp_path, monkeypatch):
    import hanuman_jax.training.step as step_module

    real = step_module.loss_fn

    def poisoned(*args, **kw):  # every step's loss (so its gradient) is NaN: a fault on purpose
        total, metrics = real(*args, **kw)
        return total * jnp.nan, metrics

    monkeypatch.setattr(step_module, "loss_fn", poisoned)
    run = tmp_path / "nan"
    cfg = _cfg("--config.train.steps=50", "--config.train.max_nonfinite_steps=3")
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(train.max_nonfinite_steps=3\)"
                       " .* up to step 3; saved step 4 to"):  # fmt: skip
        train(cfg, run, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["nonfinite_steps"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    saved = ocp.StandardCheckpointer().restore(run / "checkpoints" / "4" / "state")
    assert int(saved["step"]) == 4 and int(saved["guard"]["nonfinite_in_a_row"]) == 4
    fresh = jax.device_get(init_state(build_setup(cfg, sharding.make_mesh(cfg.mesh)))["params"])
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(saved["params"]), strict=True):
        np.testing.assert_array_equal(a, b)  # no update was applied


def test_a_workdir_that_cannot_be_written_fails_at_start(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"--workdir .*a_file/run is not writable"):
        train(_cfg(), tmp_path / "a_file" / "run", progress=False)


def test_a_run_trained_with_cudnn_attention_loads_where_cudnn_is_absent(tmp_path):
    """A run from an A100/H100 (model.attention=cudnn) exports and generates on a CPU or T4."""
    run = tmp_path / "run"
    train(_cfg("--config.train.steps=1"), run, progress=False)
    want = load_params(run).params
    meta_file = run / "checkpoints" / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"] |= {"attention": "cudnn", "dtype": "bfloat16"}
    meta_file.write_text(json.dumps(meta))
    seal(meta_file.parents[1], None)  # the new size and hash, or the step reads as damaged
    got = load_params(run).params  # the saved config's attention cannot be built on a CPU
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_resume_may_change_how_the_model_runs_but_not_what_it_is(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="hanuman_jax")
    run = tmp_path / "run"
    train(_cfg("--config.train.steps=2"), run, progress=False)
    # out of memory: turn on remat and attention blocks, and carry on from the checkpoint
    train(_cfg("--config.train.steps=3", "--config.model.remat=full",
               "--config.model.attention_block=32"), run, progress=False)  # fmt: skip
    assert _steps(run) == [1, 2, 3]
    assert "model.attention_block=0 there, 32 now; model.remat='none' there, 'full' now" in (
        caplog.text
    )
    with pytest.raises(CheckpointError, match="model.norm_eps=1e-05 there, 0.001 now"):
        train(_cfg("--config.train.steps=4", "--config.model.norm_eps=1e-3"), run, progress=False)


def test_a_file_that_cannot_be_read_is_damage_not_a_traceback(tmp_path, monkeypatch):
    """A step an ongoing run deletes while `generate` hashes it, or an unreadable file: named."""
    from hanuman_jax.checkpoint import files

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "data").write_bytes(b"x" * 100)
    files.seal(tmp_path, None)
    assert damage(tmp_path) is None

    def gone(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(files, "file_sha256", gone)
    assert damage(tmp_path) == "state/data cannot be read (No such file or directory)"
