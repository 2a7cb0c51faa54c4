"""Reading a run's parameters back without the rest of the train state.

`load_params` is the one door through which export, generation, evaluation and
`train.init_from` read a checkpoint. It restores only `state.params` (the optimizer state is never
read), onto one device or onto the shardings it is given, whatever mesh the checkpoint was written
on. The model is rebuilt from the config saved with the checkpoint, and must be what the checkpoint
holds (`check_arrays`: a partial restore would read a part of it and say nothing). Which step is
whole, and what its metadata says, come from files.py, as for training's resume.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp

from hanuman_jax.checkpoint import files
from hanuman_jax.config import ConfigError, ModelConfig
from hanuman_jax.model.build import abstract_params


@dataclasses.dataclass
class Loaded:
    params: dict  # the model's pure parameter dict, as the train state holds it
    config: ml_collections.ConfigDict  # the run's config, as saved with the checkpoint
    meta: dict  # the step's whole metadata (an imported model's: its Hugging Face config too)
    model_cfg: ModelConfig
    step: int
    directory: Path  # the step's directory
    tokenizer: Path | None  # the tokenizer copied into the checkpoint, else the config's, if found


def find_step(root: Path, step: int | None = None) -> tuple[int, dict]:
    """(step, metadata) of `step` under `root`, or of the newest whole one; ConfigError naming
    the steps there when it is absent or damaged (and the newest whole step before a damaged
    `step`)."""
    steps = files.saved_steps(root)
    if not steps:
        raise ConfigError(f"{root} holds no finished checkpoint")
    if step is None:
        found, damaged = files.newest_whole(root, files.read_meta)
        if found is None:
            raise ConfigError(f"{root} holds no whole checkpoint ({files.listing(damaged)})")
        return found
    if step not in steps:
        raise ConfigError(
            f"{root} has no checkpoint for step {step}; saved steps: {', '.join(map(str, steps))}"
        )
    try:
        files.check_whole(root / str(step))
        return step, files.read_meta(root / str(step))
    except files.Damaged as e:
        older = files.whole_before(root, step)
        before = "no step" if older is None else f"step {older}"
        raise files.CheckpointError(f"{e}; {before} before it is whole") from None


def saved_config(meta: dict, step_dir: Path) -> ml_collections.ConfigDict:
    if not isinstance(meta.get("config"), dict):
        raise ConfigError(f"checkpoint {step_dir}: {files.META} holds no config")
    return ml_collections.ConfigDict(meta["config"])


def saved_model(config: ml_collections.ConfigDict, step_dir: Path) -> ModelConfig:
    """The model of a step's saved config; ConfigError naming its metadata when that holds none,
    or one that does not load."""
    if "model" not in config:
        raise ConfigError(f"checkpoint {step_dir}: {files.META} holds no config.model")
    try:
        return ModelConfig.from_config(config.model)
    except ConfigError as e:
        raise ConfigError(
            f"checkpoint {step_dir}: {files.META} holds a model that does not load ({e})"
        ) from None


def shapes(tree) -> dict[str, tuple]:
    """Each array's shape by its dotted name (`params.layers.0.attn.wq`), alike for int and str
    keys and for named tuples (Orbax reads a checkpoint's tree back as dicts of str keys)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_dotted(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_arrays(step_dir: Path, target, *, params_only: bool = False) -> None:
    """Damaged, naming the first array that differs, unless the step's `state` holds the names
    and shapes of `target` (what its metadata's model implies), no fewer and no more; with
    `params_only`, the optimizer state and the rest of the train state are not compared."""
    try:
        saved = shapes(ocp.PyTreeCheckpointHandler().metadata(step_dir / "state").tree)
    except (OSError, ValueError, KeyError) as e:
        raise files.Damaged(step_dir, f"state unreadable: {files.first_line(e)}") from None
    if params_only:
        saved = {k: v for k, v in saved.items() if k.startswith("params.")}
    wanted = shapes(target)
    model = f"the model in {files.META}"
    for name in sorted(saved | wanted):
        have, want = saved.get(name), wanted.get(name)
        if have == want:
            continue
        if have is None:
            raise files.Damaged(step_dir, f"{model} has {name} {want}, which state does not hold")
        if want is None:
            raise files.Damaged(step_dir, f"state holds {name} {have}, which {model} does not have")
        raise files.Damaged(step_dir, f"{model} has {name} {want}, state holds {have}")


def load_params(path: str | Path, step: int | None = None, *, shardings=None, dtype=None) -> Loaded:
    """The parameters of `step` (default: the newest) of the run at `path`.

    `shardings`: a tree of shardings matching the params (default: all on the first device).
    `dtype`: cast floating parameters to it on restore (default: as saved).
    """
    root = files.checkpoint_root(path)
    step, meta = find_step(root, step)
    return restore_step(root / str(step), meta, shardings=shardings, dtype=dtype)


def restore_step(step_dir: Path, meta: dict, *, shardings=None, dtype=None) -> Loaded:
    """`load_params` of one step already found whole, whose metadata is `meta`."""
    config = saved_config(meta, step_dir)
    model_cfg = saved_model(config, step_dir)
    target = abstract_params(model_cfg)
    check_arrays(step_dir, {"params": target}, params_only=True)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, target)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s),
        target,
        shardings,
    )
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), target
    )
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        try:
            restored = ckptr.restore(
                step_dir / "state",
                args=ocp.args.PyTreeRestore(
                    item={"params": target},
                    restore_args={"params": restore_args},
                    partial_restore=True,
                ),
            )
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise ConfigError(
                f"checkpoint {step_dir}: its parameters do not match the model in its saved "
                f"config ({files.first_line(e)})"
            ) from None
    return Loaded(
        params=restored["params"],
        config=config,
        meta=meta,
        model_cfg=model_cfg,
        step=int(step_dir.name),
        directory=step_dir,
        tokenizer=_tokenizer(step_dir, config),
    )


def _tokenizer(step_dir: Path, config: ml_collections.ConfigDict) -> Path | None:
    if copied := files.tokenizer_copy(step_dir):
        return copied
    from hanuman_jax.data import DataError, resolve_file

    try:
        return resolve_file(config.data.tokenizer)
    except (DataError, AttributeError):
        return None


def load_workdir(workdir: str | Path, step: int | None = None, **kwargs) -> Loaded:
    """`load_params` for a command's `--workdir`: one that does not exist is named with what its
    parent holds."""
    path = Path(workdir).expanduser().absolute()
    if not path.exists():
        raise ConfigError(f"--workdir {files.missing(path)}")
    return load_params(path, step, **kwargs)
