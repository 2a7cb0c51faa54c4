"""Orbax checkpoints of training: the train state, each process's Grain iterator state, metadata,
a copy of the tokenizer, and a manifest that tells a whole checkpoint from a damaged one (the
on-disk layout: files.py)."""

from __future__ import annotations

import json
import logging
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

log = logging.getLogger("hanuman_jax")

_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax writes <step> here, then renames it into place


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

    def save(self, step: int, state, data_state: dict, meta: dict) -> float:
        """Starts writing `step`; returns the seconds the caller was held (the device-to-host
        copy, and any wait for the previous save). `data_state`: the iterator's `get_state()`
        taken at this step (an async save must not read the iterator later)."""
        start = time.perf_counter()
        self.manager.wait_until_finished()  # `_seal` must see the step it belongs to
        self._saving = step
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
    if saved.get("train", {}).get("steps") not in (None, cfg.train.steps):
        log.warning(
            "train.steps changed from %s to %s: the learning-rate schedule is stretched from here",
            saved["train"]["steps"],
            cfg.train.steps,
        )


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
