"""Resuming with a changed config or data, and a save that finds the disk full: each is one
accurate message and a defined behaviour, never a "damaged" checkpoint or pages of tracebacks."""

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hanuman_jax.checkpoint import files
from hanuman_jax.checkpoint.files import CheckpointError
from hanuman_jax.checkpoint.manager import Checkpointer, check_resumable, disk_full
from hanuman_jax.config import load_config
from hanuman_jax.data import make_dataset
from hanuman_jax.training.loop import train
from hanuman_jax.training.optim import lr_schedule

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--config.model.num_layers=2", "--config.model.d_model=64", "--config.data.seq_len=64",
         "--config.train.batch_size=4", "--config.train.log_every=1",
         "--config.train.eval_every=0")  # fmt: skip
TOKENIZER = ROOT / "hanuman_jax" / "assets" / "sample" / "tokenizer.model"
TOKENIZER_META = {"file": "tokenizer.model", "vocab_size": 4096, "sha256": "aa"}

pytestmark = pytest.mark.usefixtures("shared_compile_cache")  # runs share compilations


def _cfg(*extra):
    return load_config(ROOT / "configs" / "tiny.py", [*SMALL, "--config.model.vocab_size=4096",
                                                       *extra])  # fmt: skip


def _resume(then: tuple, now: tuple, step: int) -> None:
    """check_resumable of a checkpoint at `step` saved under overrides `then`, run with `now`."""
    meta = {"config": _cfg(*then).to_dict(), "tokenizer": TOKENIZER_META}
    check_resumable(_cfg(*now), meta, Path(f"/runs/x/checkpoints/{step}"), "aa")


def test_a_changed_schedule_names_the_lr_jump_and_refuses_a_large_rise(caplog):
    caplog.set_level(logging.WARNING, logger="hanuman_jax")
    old, new = _cfg("--config.train.steps=300"), _cfg("--config.train.steps=600")
    before, after = float(lr_schedule(old)(299)), float(lr_schedule(new)(300))  # the real schedule
    assert after / before > 5  # a longer cosine, at the step where the shorter one has ended
    with pytest.raises(CheckpointError) as error:
        _resume(("--config.train.steps=300",), ("--config.train.steps=600",), 300)
    assert (f"train.steps 300 -> 600: the learning rate goes from {before:.3g} at step 300 (the "
            f"checkpoint's last, under its schedule) to {after:.3g} at step 301 (the next, under "
            f"this config's, which ends at step 600), {after / before:.2f}x in one step"
            ) in str(error.value)  # fmt: skip
    assert "set train.allow_lr_jump=true" in str(error.value) and "train.init_from" in str(
        error.value
    )

    caplog.clear()  # opted in: the same numbers, as a warning
    _resume(("--config.train.steps=300",),
            ("--config.train.steps=600", "--config.train.allow_lr_jump=true"), 300)  # fmt: skip
    assert f"to {after:.3g} at step 301" in caplog.text and "stretched" not in caplog.text

    caplog.clear()  # a small rise, or a fall, goes on with the numbers
    _resume(("--config.train.steps=300",), ("--config.train.steps=330",), 100)
    _resume(("--config.optimizer.peak_lr=3e-3",), ("--config.optimizer.peak_lr=1e-3",), 100)
    assert "train.steps 300 -> 330: the learning rate goes from 0.00246 at step 100" in caplog.text
    assert "optimizer.peak_lr 0.003 -> 0.001: the learning rate goes from" in caplog.text
    assert "0.33x in one step" in caplog.text

    caplog.clear()  # shorter than the checkpoint: nothing to train, and it says so
    _resume(("--config.train.steps=600",), ("--config.train.steps=200",), 300)
    assert caplog.messages == [
        "train.steps 600 -> 200: the checkpoint's step 300 is at or past train.steps, nothing is "
        "left to train"
    ]


def test_the_rates_a_resume_names_are_those_the_run_logs(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="hanuman_jax")
    run = tmp_path / "run"
    train(_cfg("--config.train.steps=4"), run, progress=False)
    train(_cfg("--config.train.steps=6"), run, progress=False)  # a 1.26x rise: goes on
    lr = {row["step"]: row["lr"] for row in map(json.loads, (run / "metrics.jsonl").open())}
    assert (f"train.steps 4 -> 6: the learning rate goes from {lr[4]:.3g} at step 4 (the "
            f"checkpoint's last, under its schedule) to {lr[5]:.3g} at step 5 (the next") in (
        caplog.text
    )  # fmt: skip
    assert sorted(lr) == [1, 2, 3, 4, 5, 6]


def test_a_changed_batch_or_source_list_is_refused_by_name_not_called_damaged(
    tmp_path, monkeypatch
):
    run = tmp_path / "run"
    saved = ("--config.train.steps=4", "--config.train.checkpoint_every=2")
    train(_cfg(*saved), run, progress=False)
    ckpts = run / "checkpoints"
    extra = tmp_path / "extra.txt"
    extra.write_text("one more source\n" * 20)
    sources = [*_cfg().data.sources, {"path": str(extra), "weight": 0.1}]
    for change, said in [
        (("--config.train.batch_size=8",), "train.batch_size 4 -> 8"),
        ((f"--config.data.sources={sources}",), f"data.sources 4 entries -> 5 ('{extra}' added)"),
    ]:
        with pytest.raises(CheckpointError) as error:
            train(_cfg(*saved, "--config.train.steps=6", *change), run, progress=False)
        assert str(error.value).startswith(
            f"checkpoint {ckpts / '4'} holds a data position this run cannot take up ({said}): "
            "resume with the checkpoint's values, or start a new stage from it in another "
            f"--workdir with train.init_from={ckpts}"
        )
        assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4"]  # none set aside or used

    # a change only the data position shows (the process count): refused, not damaged either
    monkeypatch.setattr("hanuman_jax.checkpoint.manager.position_changes", lambda *a: [])
    with pytest.raises(CheckpointError) as error:
        train(_cfg(*saved, "--config.train.batch_size=8"), run, progress=False)
    assert str(error.value) == (
        f"checkpoint {ckpts / '4'}: its data position does not fit this run (the checkpoint's "
        "data state has 4 lanes, this run 8: train.batch_size (or the process count) changed)"
    )
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4"]


def test_turning_gradient_clipping_on_or_off_is_refused_by_name():
    """optax.chain(clip, adamw) holds other state than adamw: named, not called damaged."""
    for then, now in [("0.0", "1.0"), ("1.0", "0.0")]:
        with pytest.raises(CheckpointError, match=rf"grad_clip={then}, this run has {now}: "):
            _resume((f"--config.optimizer.grad_clip={then}",),
                    (f"--config.optimizer.grad_clip={now}",), 4)  # fmt: skip
    _resume(("--config.optimizer.grad_clip=1.0",), ("--config.optimizer.grad_clip=0.5",), 4)


def test_a_source_given_another_path_is_refused_naming_each_change():
    """Same number of sources, other files: the position's record numbers are a's, not b's."""
    then = ("--config.data.sources=[{'path': 'a.jsonl'}, {'path': 'hf:x/y'}]",)
    now = ("--config.data.sources=[{'path': 'b.jsonl'}, {'path': 'hf:x/z'}]",)
    with pytest.raises(CheckpointError) as error:
        _resume(then, now, 4)
    assert str(error.value).startswith(
        "checkpoint /runs/x/checkpoints/4 holds a data position this run cannot take up "
        "(data.sources[0] 'a.jsonl' -> 'b.jsonl'; data.sources[1] 'hf:x/y' -> 'hf:x/z'): resume "
        "with the checkpoint's values, or start a new stage from it in another --workdir with "
        "train.init_from=/runs/x/checkpoints"
    )
    _resume(then, then, 4)  # the same list resumes


def test_a_source_file_swapped_under_the_data_position_is_named(tmp_path, caplog):
    """A file replaced by another of as many records and bytes: only its ends' hash tells."""
    data = tmp_path / "a.txt"
    data.write_text("".join(f"line {i:03d} of the first file\n" for i in range(40)))
    cfg = _cfg(f"--config.data.sources=[{{'path': '{data}'}}]")
    first = iter(make_dataset(cfg, TOKENIZER, prefetch=0))
    next(first)
    state = json.loads(json.dumps(first.get_state()))  # as a checkpoint holds it
    same = iter(make_dataset(cfg, TOKENIZER, prefetch=0))
    same.set_state(state)
    assert not caplog.records  # the same files: nothing to say

    data.write_text("".join(f"line {i:03d} of the other file\n" for i in range(40)))
    swapped = iter(make_dataset(cfg, TOKENIZER, prefetch=0))
    swapped.set_state(state)
    assert caplog.messages == [
        f"data.sources[0] '{data}': a.txt changed (as many records and bytes, but other bytes at "
        "its start or end) since the checkpoint was saved; its data position is kept as it is, so "
        "the run goes on at the same record numbers of the files as they are now (some records "
        "may be read twice, others never)"
    ]
    assert np.array_equal(next(swapped)["segment_ids"], next(same)["segment_ids"])  # kept as is

    caplog.clear()
    data.write_text(data.read_text() + "one more line\n")
    grown = iter(make_dataset(cfg, TOKENIZER, prefetch=0))
    grown.set_state(state)
    assert "a.txt changed (40 records then, 41 now)" in caplog.text


def _save(ckpt: Checkpointer, step: int) -> None:
    ckpt.save(step, {"params": {"w": np.full((5, 3), step, np.float32)}}, {"i": step},
              {"config": {}})  # fmt: skip


def test_a_full_disk_during_a_background_save_is_one_line_naming_the_last_whole_step(
    tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, keep=3, tokenizer=TOKENIZER)
    _save(ckpt, 2)
    ckpt.wait()

    def no_space(step_dir, tokenizer):  # the last writes of the background save
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(step_dir / "manifest.json"))

    monkeypatch.setattr(files, "seal", no_space)
    _save(ckpt, 4)
    with pytest.raises(CheckpointError) as error:
        ckpt.wait()
    ckpt.close()
    said = str(error.value)
    assert said.startswith(f"no space left on {root} (the disk mounted at /") and said.endswith(
        f", errno ENOSPC) while saving step 4; the newest whole checkpoint is step 2 at "
        f"{root / '2'}; free some space and run the same command to resume from it"
    )
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert files.saved_steps(root) == [2] and files.damage(root / "2") is None


def test_disk_full_is_told_from_tensorstore_errors_and_wrapped_ones():
    tensorstore = ValueError(  # as a state write on a full disk raises it
        'RESOURCE_EXHAUSTED: Failed writing: "d/7c": Failed to write 2703339 bytes to file 14: '
        "No space left on device [os_error_code='28']"
    )
    try:
        try:
            raise OSError(errno.ENOSPC, "disk full")
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as e:
        wrapped = e
    assert disk_full(tensorstore) and disk_full(wrapped)
    assert not disk_full(OSError(errno.EACCES, "denied")) and not disk_full(ValueError("bad"))


def test_a_resume_after_a_full_disk_starts_from_the_step_it_named(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = _cfg("--config.train.steps=4", "--config.train.checkpoint_every=2")
    real, calls = files.seal, []

    def fills_up(step_dir, tokenizer):
        calls.append(step_dir)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(step_dir, tokenizer)

    monkeypatch.setattr(files, "seal", fills_up)
    with pytest.raises(CheckpointError, match="while saving step 4; the newest whole checkpoint "
                       f"is step 2 at {run / 'checkpoints' / '2'}"):  # fmt: skip
        train(cfg, run, progress=False)
    monkeypatch.setattr(files, "seal", real)  # space freed
    train(cfg, run, progress=False)
    assert files.saved_steps(run / "checkpoints") == [2, 4]
    shutil.rmtree(run)
