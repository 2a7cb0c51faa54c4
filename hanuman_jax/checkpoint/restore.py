"""Reading a run's parameters back without the rest of the train state.

`load_params` is the one door through which export, generation, evaluation and
`train.init_from` read a checkpoint. It restores only `state.params` (the optimizer state is never
read), onto one device or onto the shardings it is given, whatever mesh the checkpoint was written
on. The model is rebuilt from the config saved with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from hanuman_jax.config import ConfigError, ModelConfig

log = logging.getLogger("hanuman_jax")

TOKENIZER_DIR = "tokenizer"  # <step dir>/tokenizer/tokenizer.model: the run's tokenizer, copied
TOKENIZER_FILE = "tokenizer.model"
MANIFEST = "manifest.json"  # <step>/manifest.json: the size of every file in the step's items


@dataclasses.dataclass
class Loaded:
    params: dict  # the model's pure parameter dict, as the train state holds it
    config: ml_collections.ConfigDict  # the run's config, as saved with the checkpoint
    model_cfg: ModelConfig
    step: int
    directory: Path  # the step's directory
    tokenizer: Path | None  # the tokenizer copied into the checkpoint, else the config's, if found


def checkpoint_root(path: str | Path) -> Path:
    """Accepts a workdir (holding `checkpoints/`) or the `checkpoints/` directory itself."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.name == "checkpoints" or any(p.name.isdigit() for p in path.iterdir()):
        return path
    raise ConfigError(f"{path} holds no checkpoints/ directory: is it a training workdir?")


def saved_steps(root: Path) -> list[int]:
    """Steps whose save finished (Orbax renames a step's directory into place when complete)."""
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def damage(step_dir: Path) -> str | None:
    """Why the checkpoint in `step_dir` is not whole (a file missing or truncated), or None."""
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, size in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def newest_whole_step(root: Path) -> int:
    """The newest step under `root` that `damage` finds whole; each damaged one on the way is
    named in a warning."""
    steps = saved_steps(root)
    for step in reversed(steps):
        reason = damage(root / str(step))
        if reason is None:
            return step
        log.warning("checkpoint %s is damaged (%s); trying the one before", root / str(step),
                    reason)  # fmt: skip
    raise ConfigError(f"{root} holds no whole checkpoint (saved steps: {steps})")


def read_config(step_dir: Path) -> ml_collections.ConfigDict:
    meta = step_dir / "meta" / "metadata"
    try:
        saved = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {step_dir} has no readable meta/metadata: {e}") from None
    if "config" not in saved:
        raise ConfigError(f"checkpoint {step_dir}: meta/metadata holds no config")
    return ml_collections.ConfigDict(saved["config"])


def abstract_params(model_cfg: ModelConfig) -> dict:
    """The parameter tree's shapes and dtypes. They do not depend on the attention kernel, so a
    run trained with `model.attention=cudnn` loads where cuDNN is absent (a CPU, a T4)."""
    from hanuman_jax.model.transformer import Transformer

    model_cfg = dataclasses.replace(model_cfg, attention="xla")
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_params(path: str | Path, step: int | None = None, *, shardings=None, dtype=None) -> Loaded:
    """The parameters of `step` (default: the newest) of the run at `path`.

    `shardings`: a tree of shardings matching the params (default: all on the first device).
    `dtype`: cast floating parameters to it on restore (default: as saved).
    """
    root = checkpoint_root(path)
    steps = saved_steps(root)
    if not steps:
        raise ConfigError(f"{root} holds no finished checkpoint")
    if step is None:
        step = newest_whole_step(root)
    elif step not in steps:
        raise ConfigError(
            f"{root} has no checkpoint for step {step}; saved steps: {', '.join(map(str, steps))}"
        )
    elif reason := damage(root / str(step)):
        raise ConfigError(f"checkpoint {root / str(step)} is damaged: {reason}")
    step_dir = root / str(step)
    config = read_config(step_dir)
    model_cfg = ModelConfig.from_config(config.model)
    target = abstract_params(model_cfg)
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
                f"config ({str(e).splitlines()[0][:300]})"
            ) from None
    return Loaded(
        params=restored["params"],
        config=config,
        model_cfg=model_cfg,
        step=step,
        directory=step_dir,
        tokenizer=_tokenizer(step_dir, config),
    )


def _tokenizer(step_dir: Path, config: ml_collections.ConfigDict) -> Path | None:
    copied = step_dir / TOKENIZER_DIR / TOKENIZER_FILE
    if copied.is_file():
        return copied
    from hanuman_jax.data import DataError, resolve_file

    try:
        return resolve_file(config.data.tokenizer)
    except (DataError, AttributeError):
        return None
