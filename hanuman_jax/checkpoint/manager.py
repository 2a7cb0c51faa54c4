"""Orbax checkpoints of training: the train state, each process's Grain iterator state, metadata,
a copy of the tokenizer, and a manifest that tells a whole checkpoint from a damaged one (the
on-disk layout: files.py)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from hanuman_jax.checkpoint import files, restore
from hanuman_jax.checkpoint.files import CheckpointError, Damaged
from hanuman_jax.config import ConfigError
from hanuman_jax.data import DataError
from hanuman_jax.data.pipeline import position_changes
from hanuman_jax.training.optim import lr_schedule

log = logging.getLogger("hanuman_jax")

_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax writes <step> here, then renames it into place
_NO_SPACE = os.strerror(errno.ENOSPC)  # how tensorstore's errors name it: "No space left on device"


def disk_full(e: BaseException | None) -> bool:
    """Whether `e`, or an exception it was raised from, is a write that found the disk full."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or _NO_SPACE in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _DiskFullLogs(logging.Filter):
    """Drops Orbax's records (each with its traceback) of a save that found the disk full."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (_NO_SPACE in record.getMessage() or disk_full(error))


def _quiet_failed_saves() -> None:
    """A failed save is one CheckpointError (`Checkpointer._disk_full`), not pages of echoes:
    Orbax's and asyncio's log records of a full disk are dropped, and so is `RuntimeError: Event
    loop is closed`, which each of the save's other tensorstore writes reports as unraisable when
    it ends on Orbax's event loop, closed at the first failure. Installed once per process."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_failed_saves", False):
        return
    for name in ("absl", "asyncio"):  # Orbax logs through absl; asyncio, at exit, the futures
        logging.getLogger(name).addFilter(_DiskFullLogs())  # of writes no one waited for

    def hook(unraisable) -> None:
        if str(unraisable.exc_value) != "Event loop is closed":
            previous(unraisable)

    hook.quiets_failed_saves = True
    sys.unraisablehook = hook


class Checkpointer:
    """Saves `{state, data, meta}` under `WORKDIR/checkpoints/<step>/`, asynchronously.

    Orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
    directory named by its step alone was written whole. Just before the rename, `_seal` adds the
    tokenizer copy and `manifest.json`, so a file truncated or lost later is caught by
    `files.damage()`.
    """

    def __init__(self, directory: str | Path, *, keep: int, tokenizer: Path | None = None):
        self.directory = Path(directory).absolute()
        self.tokenizer = tokenizer
        self._saving: int | None = None  # the step the background save is writing
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,  # what a killed save left behind
            async_options=ocp.options.AsyncOptions(post_finalization_callback=self._seal),
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "meta"), options=options
        )
        _quiet_failed_saves()

    def save(self, step: int, state, data_state: dict, meta: dict) -> float:
        """Starts writing `step`; returns the seconds the caller was held (the device-to-host
        copy, and any wait for the previous save). `data_state`: the iterator's `get_state()`
        taken at this step (an async save must not read the iterator later)."""
        start = time.perf_counter()
        self.wait()  # `_seal` must see the step it belongs to
        self._saving = step
        with self._disk_full():
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(item=_Position(data_state)),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,
            )
        return time.perf_counter() - start

    def _seal(self) -> None:
        """Runs on the primary process after every process has written its part, before the
        rename that commits the step."""
        tmp = self.directory / f"{self._saving}{_TMP_SUFFIX}"
        files.seal(tmp if tmp.is_dir() else self.directory / str(self._saving), self.tokenizer)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores into `abstract_state`'s structure, dtypes and shardings, and the iterator."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(item=data_iterator),
            ),
        )
        return restored["state"]

    def restore_newest(self, abstract_state, data_iterator, check: Callable[[dict, Path], None]):
        """(step, state) of the newest whole checkpoint, or None when there is none at all.

        `check(meta, step_dir)` raises for a checkpoint of another model or tokenizer. A damaged
        step (one whose arrays are not those of `abstract_state` is damaged too) is named in a
        warning and set aside as `<step>.damaged`, once an older one restored; if none restores,
        CheckpointError says why for each and nothing is moved."""

        def open_step(step_dir: Path):
            meta = files.read_meta(step_dir)
            check(meta, step_dir)
            restore.check_arrays(step_dir, abstract_state)
            try:
                return self.restore(int(step_dir.name), abstract_state, data_iterator)
            except DataError as e:  # a whole step whose data position is not this pipeline's
                raise CheckpointError(
                    f"checkpoint {step_dir}: its data position does not fit this run ({e})"
                ) from None
            except (ValueError, OSError, KeyError) as e:
                raise Damaged(step_dir, f"restore failed: {files.first_line(e)}") from None

        found, damaged = files.newest_whole(self.directory, open_step)
        if found:
            self._set_aside([s for s, _ in damaged])
            return found
        if damaged:
            raise CheckpointError(
                f"{self.directory} holds checkpoints but none is whole ({files.listing(damaged)}); "
                "move them away to start from scratch, or copy in a whole checkpoint"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames damaged steps out of Orbax's sight, so that new saves can take their numbers."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"{step}.damaged"
                while target.exists():
                    target = target.with_name(target.name + "_")
                (self.directory / str(step)).rename(target)
                log.warning("moved damaged checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("hanuman_jax checkpoints set aside")
        self.manager.reload()

    def wait(self) -> None:
        """Waits for the background save; a full disk is one CheckpointError (`_disk_full`)."""
        with self._disk_full():
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    @contextlib.contextmanager
    def _disk_full(self):
        """Turns a save's ENOSPC (an OSError, or tensorstore's ValueError naming it) into one line
        naming the disk and the newest whole step, which survives: Orbax commits a step by a
        rename, and only once it is written whole."""
        try:
            yield
        except Exception as e:
            if not disk_full(e):
                raise
            step, root = self._saving, self.directory
            mount = next((p for p in (root, *root.parents) if os.path.ismount(p)), root.anchor)
            whole = files.whole_before(root, step + 1) if step is not None else None
            newest = (f"the newest whole checkpoint is step {whole} at {root / str(whole)}; free "
                      "some space and run the same command to resume from it" if whole is not None
                      else "no whole checkpoint was saved before it")  # fmt: skip
            raise CheckpointError(
                f"no space left on {root} (the disk mounted at {mount}, errno ENOSPC) while "
                f"saving step {step}; {newest}"
            ) from None


class _Position:
    """A captured iterator state; Grain's handler writes non-DatasetIterator states as bytes."""

    def __init__(self, state: dict):
        self.state = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self.state


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key in tree for k, v in _flatten(tree[key], f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


# How the same model runs, not what it is: a resume may change them (remat after running out of
# memory, another attention or expert kernel on another machine); every parameter keeps its meaning.
EXECUTION_FIELDS = frozenset({
    "model.remat", "model.attention", "model.attention_block", "model.moe.grouped_matmul",
    "model.moe.block_size", "model.moe.dispatch", "model.moe.capacity_factor",
})  # fmt: skip


def model_diffs(now: dict, then: dict) -> list[str]:
    """`model.KEY=VALUE there, VALUE now` for each model field that differs."""
    now, then = _flatten(now, "model."), _flatten(then, "model.")
    return [
        f"{k}={then.get(k)!r} there, {now.get(k)!r} now"
        for k in sorted(now | then)
        if now.get(k) != then.get(k)
    ]


def check_tokenizer(meta: dict, where: Path, tokenizer_sha: str, cfg) -> None:
    """The checkpoint's tokenizer must be the config's: the same ids must mean the same pieces."""
    saved = meta.get("tokenizer") or {}
    if saved.get("sha256") not in (None, tokenizer_sha):
        raise CheckpointError(
            f"checkpoint {where} was trained with another tokenizer ({saved.get('file')}, "
            f"{saved.get('vocab_size')} pieces, a copy in {where / files.TOKENIZER_DIR}) than "
            f"data.tokenizer={cfg.data.tokenizer!r}; train with that one, or use another --workdir"
        )


def check_resumable(cfg: ml_collections.ConfigDict, meta: dict, where: Path, tokenizer_sha: str):
    """The checkpoint must hold this model and tokenizer; a changed run length only reshapes the
    schedule, and a change in how the model runs (EXECUTION_FIELDS) is logged."""
    saved = meta.get("config", {})
    diffs = model_diffs(cfg.model.to_dict(), saved.get("model", {}))
    how = [d for d in diffs if d.split("=", 1)[0] in EXECUTION_FIELDS]
    if how:
        log.warning("resuming with the model run differently: %s", "; ".join(how))
    diffs = [d for d in diffs if d not in how]
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} was trained with a different model ({'; '.join(diffs[:4])}); "
            "use another --workdir or the same model config"
        )
    check_tokenizer(meta, where, tokenizer_sha, cfg)
    clipped = saved.get("optimizer", {}).get("grad_clip")
    if clipped is not None and (clipped > 0) != (cfg.optimizer.grad_clip > 0):
        raise CheckpointError(  # clipping is a link of the optimizer's chain, with its own state
            f"checkpoint {where} was trained with optimizer.grad_clip={clipped}, this run has "
            f"{cfg.optimizer.grad_clip}: turning clipping on or off changes the optimizer state; "
            "keep it as it was (any value > 0 may replace another), or start a new stage from it "
            f"in another --workdir with train.init_from={where.parent}"
        )
    if changes := position_changes(saved, cfg):
        raise CheckpointError(
            f"checkpoint {where} holds a data position this run cannot take up "
            f"({'; '.join(changes)}): resume with the checkpoint's values, or start a new stage "
            f"from it in another --workdir with train.init_from={where.parent} (its parameters, "
            "with a fresh optimizer, schedule and data position)"
        )
    check_schedule(cfg, saved, where)


# The fields of the learning-rate schedule (optim.lr_schedule), and how far a resume may raise the
# rate from one step to the next unless train.allow_lr_jump.
SCHEDULE_FIELDS = ("train.steps", "optimizer.peak_lr", "optimizer.min_lr_ratio",
                   "optimizer.warmup_fraction")  # fmt: skip
MAX_LR_RISE = 1.5


def check_schedule(cfg: ml_collections.ConfigDict, saved: dict, where: Path) -> None:
    """A resume that changes the schedule (a longer or shorter run, another peak): one warning
    with the learning rate of the checkpoint's last step under its schedule and of the next under
    this config's, the steps numbered as in metrics.jsonl; CheckpointError if that is a rise over
    MAX_LR_RISE x, unless train.allow_lr_jump.

    The new schedule runs from the next step as if it had been the run's from the start (a longer
    run's cosine is stretched: at the same step its rate is higher, several times near the end). A
    large rise is refused, not smoothed over: a re-anchored schedule would depend on when the run
    was resumed, not on its config alone (and every checkpoint would have to carry each resume's
    anchor), so that the user decides, once, at the step where it matters. A small rise, or any
    fall, goes on with the warning."""
    then = _flatten({k: saved.get(k, {}) for k in ("train", "optimizer")})
    now = _flatten({k: cfg[k].to_dict() for k in ("train", "optimizer")})
    changed = [f"{k} {then[k]} -> {now[k]}" for k in SCHEDULE_FIELDS
               if then.get(k) not in (None, now[k])]  # fmt: skip
    if not changed:
        return
    step, end = int(where.name), cfg.train.steps
    if step >= end:
        log.warning("%s: the checkpoint's step %d is at or past train.steps, nothing is left to "
                    "train", "; ".join(changed), step)  # fmt: skip
        return
    old = ml_collections.ConfigDict({
        "optimizer": {**cfg.optimizer.to_dict(), **saved.get("optimizer", {})},
        "train": {"steps": then.get("train.steps", end)},
    })  # fmt: skip
    before, after = float(lr_schedule(old)(step - 1)), float(lr_schedule(cfg)(step))
    rise = after / before if before > 0 else float("inf")
    what = (f"{'; '.join(changed)}: the learning rate goes from {before:.3g} at step {step} (the "
            f"checkpoint's last, under its schedule) to {after:.3g} at step {step + 1} (the next, "
            f"under this config's, which ends at step {end}), {rise:.2f}x in one step")  # fmt: skip
    if rise > MAX_LR_RISE and not cfg.train.get("allow_lr_jump", False):
        raise CheckpointError(
            f"checkpoint {where}: {what}; a rise over {MAX_LR_RISE}x can undo the training so far: "
            "keep the checkpoint's values, set train.allow_lr_jump=true to go on anyway, or start "
            "a new stage from it with train.init_from (a fresh optimizer and schedule, warmup "
            "included)"
        )
    log.warning("%s", what)


def init_params(cfg: ml_collections.ConfigDict, abstract_params: dict, shardings, tokenizer_sha):
    """`train.init_from`: the parameters (only) of the newest whole checkpoint there, in
    `shardings`; CheckpointError when they do not fit this model or its tokenizer."""
    field = f"config train.init_from={cfg.train.init_from!r}"
    try:
        root = files.checkpoint_root(cfg.train.init_from)
        step, meta = restore.find_step(root)
        saved = restore.saved_config(meta, root / str(step))
        saved_model = restore.saved_model(saved, root / str(step))
    except ConfigError as e:
        raise CheckpointError(f"{field}: {e}") from None
    step_dir = root / str(step)
    theirs = restore.shapes(restore.abstract_params(saved_model))
    ours = restore.shapes(abstract_params)
    wrong = [f"{k} is {theirs.get(k)} there, {ours.get(k)} now" for k in sorted(ours | theirs)
             if theirs.get(k) != ours.get(k)]  # fmt: skip
    if wrong:
        diffs = model_diffs(cfg.model.to_dict(), saved.model.to_dict())
        raise CheckpointError(
            f"{field}: checkpoint {step_dir} holds parameters of another shape "
            f"({'; '.join(wrong[:3])}) from a different model ({'; '.join(diffs[:4])})"
        )
    check_tokenizer(meta, step_dir, tokenizer_sha, cfg)
    same_dtype = saved.model.param_dtype == cfg.model.param_dtype
    loaded = restore.restore_step(
        step_dir, meta, shardings=shardings, dtype=None if same_dtype else cfg.model.param_dtype
    )
    log.info("initialised the parameters from %s (step %d); fresh optimizer, schedule and data",
             step_dir, step)  # fmt: skip
    return loaded.params
