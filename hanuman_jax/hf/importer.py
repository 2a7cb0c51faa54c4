"""Import a Hugging Face model: python -m hanuman_jax.import_hf --model HF_DIR --out WORKDIR

Reads a local Llama / Mistral / Mixtral checkpoint (safetensors; our own exports included) and
writes WORKDIR/checkpoints/0 in the layout `restore.load_params` and `train.init_from` read,
then prints the model config to train it with. What our model cannot compute exactly (biases,
sliding windows, other RoPE types, ...) is refused; see hf_mapping.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from hanuman_jax import cli
from hanuman_jax.checkpoint import files
from hanuman_jax.config import ConfigError, ModelConfig
from hanuman_jax.hf import mapping as hf_mapping
from hanuman_jax.hf.export import require_hf_packages
from hanuman_jax.model.build import abstract_params

log = logging.getLogger("hanuman_jax")

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers old Llama checkpoints saved; recomputed


class _SafetensorsDir:
    """The tensors of a directory's `model.safetensors` or of the shards its index names, read
    as numpy arrays (bfloat16 as ml_dtypes'): no torch."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            found = sorted(p.name for p in model_dir.iterdir())
            raise ConfigError(
                f"--model {model_dir} holds no model.safetensors (or index); found: "
                f"{', '.join(found) or 'nothing'}. A PyTorch .bin checkpoint can be converted "
                "with transformers' save_pretrained(..., safe_serialization=True)"
            )
        self.handles = [safe_open(str(model_dir / f), framework="np") for f in files]
        self.where = {name: h for h in self.handles for name in h.keys()}  # noqa: SIM118

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise ConfigError(f"the checkpoint has no tensor {name}, which the model needs")
        try:
            tensor = self.where[name].get_tensor(name)
        except (AttributeError, TypeError) as e:  # a dtype with no numpy type (float8, ...)
            raise ConfigError(
                f"tensor {name} has a dtype that numpy cannot read ({e}): convert the model to "
                "float32, float16 or bfloat16"
            ) from None
        return tensor.astype(np.float32)


def read_hf_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise ConfigError(f"--model {model_dir}: no config.json there") from None
    except ValueError as e:
        raise ConfigError(f"--model {path} is not valid JSON ({e})") from None


def write_checkpoint(
    params: dict,
    model_cfg: ModelConfig,
    workdir: str | Path,
    *,
    step: int = 0,
    tokenizer: Path | None = None,
    meta: dict | None = None,
) -> Path:
    """Saves `params` as `workdir/checkpoints/<step>` as training does (state {"params"}, meta
    {"config", "tokenizer"}, the tokenizer copy and the manifest), without optimizer or data
    state; returns the step's directory."""
    import orbax.checkpoint as ocp

    root = Path(workdir).expanduser().absolute() / "checkpoints"
    meta = {"config": {"model": dataclasses.asdict(model_cfg)}, **(meta or {})}
    if tokenizer is not None:
        meta["tokenizer"] = files.tokenizer_meta(tokenizer, _pieces(tokenizer))
    with ocp.CheckpointManager(root, item_names=("state", "meta")) as manager:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params}),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        manager.wait_until_finished()
    step_dir = root / str(step)
    files.seal(step_dir, tokenizer)
    return step_dir


def _pieces(tokenizer: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()


def import_hf(
    model_dir: str | Path,
    out: str | Path,
    *,
    param_dtype: str = "float32",
    tokenizer: str | Path | None = None,
):
    """Writes the HF model at `model_dir` as a checkpoint of ours; returns (step dir, config).
    The checkpoint keeps `tokenizer` (a SentencePiece model), else `model_dir`'s tokenizer.model
    if it has one: transformers' save_pretrained, and so TRL, write none."""
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir} is not a directory")
    require_hf_packages()
    tokenizer = _tokenizer(model_dir, tokenizer)
    hf = read_hf_config(model_dir)
    cfg = dataclasses.replace(hf_mapping.model_config_from_hf(hf), param_dtype=param_dtype)
    tensors = _SafetensorsDir(model_dir)
    params, used = hf_mapping.params_from_hf(tensors.get, cfg, abstract_params(cfg))
    unused = sorted(n for n in tensors.names() - used if not n.endswith(IGNORED_SUFFIXES))
    if cfg.tie_embeddings:
        unused = [n for n in unused if n != "lm_head.weight"]  # a tied copy, saved by some tools
    if unused:
        raise ConfigError(
            f"cannot import {model_dir} exactly: {len(unused)} tensors have no place in our "
            f"model (e.g. {', '.join(unused[:3])})"
        )
    params = _cast(params, jnp.dtype(param_dtype))
    if tokenizer is not None and _pieces(tokenizer) > cfg.vocab_size:
        raise ConfigError(
            f"--tokenizer {tokenizer} has {_pieces(tokenizer)} pieces, more than the model's "
            f"{cfg.vocab_size} embedding rows: it is not this model's tokenizer"
        )
    meta = {"imported_from": str(model_dir.absolute()), "hf_config": hf}
    return write_checkpoint(params, cfg, out, tokenizer=tokenizer, meta=meta), cfg


def _tokenizer(model_dir: Path, given: str | Path | None) -> Path | None:
    """The SentencePiece model the checkpoint keeps: `given`, else the folder's, else None."""
    if given is not None:
        path = Path(given).expanduser()
        try:
            _pieces(path)
        except (OSError, RuntimeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"--tokenizer {path} is not a SentencePiece model: {reason}") from e
        return path
    found = model_dir / files.TOKENIZER_FILE
    if found.is_file():
        return found
    log.warning(
        "%s has no %s (transformers' save_pretrained and TRL do not write one): the checkpoint "
        "keeps no tokenizer; pass --tokenizer PATH (the export's %s) so that generate and "
        "train.init_from find it",
        model_dir, files.TOKENIZER_FILE, files.TOKENIZER_FILE,
    )  # fmt: skip
    return None


def _cast(tree, dtype):
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return np.asarray(tree).astype(dtype)


def config_overrides(cfg: ModelConfig) -> list[str]:
    """Every `--config.model.*` field, as `python -m hanuman_jax.train` takes it."""

    def flat(d: dict, prefix: str):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"--config.model.{prefix}{k}={v}"

    return list(flat(dataclasses.asdict(cfg), ""))


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser("hanuman_jax.import_hf", __doc__)
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument("--out", required=True, help="workdir to write checkpoints/0 into")
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype the parameters are stored in (float32 holds fp16/bf16 "
                        "weights exactly)")  # fmt: skip
    parser.add_argument("--tokenizer", metavar="PATH", help="the SentencePiece model to keep "
                        "(default: the folder's tokenizer.model)")  # fmt: skip
    args = parser.parse_args(argv)
    cli.setup_logging()
    try:
        step_dir, cfg = import_hf(
            args.model, args.out, param_dtype=args.param_dtype, tokenizer=args.tokenizer
        )
    except ConfigError as e:
        return cli.fail(e)
    print(f"wrote {step_dir} from {args.model}")
    lines = config_overrides(cfg)
    if tokenizer := files.tokenizer_copy(step_dir):
        lines.append(f"--config.data.tokenizer={tokenizer}")
    lines.append(f"--config.train.init_from={Path(args.out).absolute()}")
    print("train from it with this model config (all of it must match):")
    print(" \\\n".join(f"  {line}" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
