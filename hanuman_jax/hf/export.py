"""Export a checkpoint as a Hugging Face model: python -m hanuman_jax.export --workdir DIR --out OUT

MoE models become `MixtralForCausalLM`, dense ones `LlamaForCausalLM` (the mapping and what it
refuses: hf_mapping.py). OUT gets `config.json`, `generation_config.json`, `model.safetensors`
(or shards of at most 2 GB and `model.safetensors.index.json`) in the per-expert layout that
transformers 4.x and 5.x, vLLM and TRL load, and the tokenizer files of `tokenizer export-hf`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from hanuman_jax import cli
from hanuman_jax.checkpoint.restore import Loaded, load_workdir
from hanuman_jax.config import ConfigError
from hanuman_jax.data import DataError
from hanuman_jax.hf import mapping as hf_mapping

DTYPES = ("float32", "float16", "bfloat16")
MAX_SHARD_BYTES = 2 * 1024**3
log = logging.getLogger("hanuman_jax")


def require_hf_packages() -> None:
    """Stops before anything is written when safetensors or tokenizers is missing: dependencies
    of ours (no torch), so only a `--no-deps` or broken install lacks them."""
    try:
        import safetensors.numpy  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"the Hugging Face export and import need safetensors and tokenizers ({e}), "
            "dependencies of hanuman-jax: pip install -c constraints.txt -e . "
            "(or pip install hanuman-jax)"
        ) from None


def special_ids(loaded: Loaded) -> dict[str, int | None]:
    """bos/eos/pad/sep ids (sep: our chat turn separator) of the checkpoint's SentencePiece model,
    or, for an imported model without one, of the Hugging Face config it came from."""
    if loaded.tokenizer is None:
        hf = loaded.meta.get("hf_config")
        if not isinstance(hf, dict):
            raise ConfigError(
                f"checkpoint {loaded.directory} has no tokenizer (no tokenizer/tokenizer.model "
                "there, and its config's data.tokenizer is not found)"
            )
        eos = hf.get("eos_token_id")
        return {"bos": hf.get("bos_token_id"), "eos": eos[0] if isinstance(eos, list) else eos,
                "pad": hf.get("pad_token_id"), "sep": None}  # fmt: skip
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(loaded.tokenizer))
    sep = sp.piece_to_id("<sep>")
    return {
        "bos": sp.bos_id() if sp.bos_id() >= 0 else None,
        "eos": sp.eos_id() if sp.eos_id() >= 0 else None,
        "pad": sp.pad_id() if sp.pad_id() >= 0 else None,
        "sep": sep if sep != sp.unk_id() else None,
    }


def _shards(tensors: list, max_bytes: int, itemsize: int) -> list[list]:
    shards, size = [[]], 0
    for item in tensors:
        nbytes = itemsize * int(_prod(item[2]))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _readable(path: Path) -> None:
    """The mode a new file gets (0666 less the umask): safetensors writes 0600, which a server
    running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def write_safetensors(tensors: list, out: Path, dtype: str, max_shard_bytes: int) -> list[Path]:
    """Writes (name, loader, shape) tensors as safetensors in `dtype`, one shard in memory at a
    time; shards and an index when they exceed `max_shard_bytes`. Through safetensors' numpy API,
    no torch: bfloat16 is ml_dtypes' (jax's), which it writes as BF16, rounded to nearest even as
    torch rounds."""
    from safetensors.numpy import save_file

    np_dtype = jnp.dtype(dtype)
    itemsize = np_dtype.itemsize
    shards = _shards(tensors, max_shard_bytes, itemsize)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for shard, filename in zip(shards, names, strict=True):
        data = {}
        for name, loader, _ in shard:
            # C order: the numpy writer copies the buffer as it lies, and loaders return .T views
            data[name] = np.ascontiguousarray(loader(), dtype=np_dtype)
            weight_map[name] = filename
            total += data[name].nbytes
        # transformers 4 refuses a file whose metadata names no format it knows
        save_file(data, str(out / filename), metadata={"format": "pt"})
        _readable(out / filename)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out / n for n in names]


def export_tokenizer(tokenizer_path: Path, out: Path, shown: Path | None = None) -> None:
    """The `tokenizer export-hf` files; a tokenizer not trained by us (an imported model's) is
    copied as `tokenizer.model` only, with a warning that names `shown` (default: `out`)."""
    from hanuman_jax.tokenizer.hf import export_hf

    try:
        export_hf(tokenizer_path, out)
    except ValueError as e:
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
        log.warning(
            "tokenizer %s copied as tokenizer.model only (%s); put the original model's "
            "tokenizer files into %s for AutoTokenizer",
            tokenizer_path, str(e).splitlines()[0], shown or out,
        )  # fmt: skip


def export(
    workdir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Writes the Hugging Face model of `step` (default: the newest) of the run at `workdir`."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is invalid: one of {', '.join(DTYPES)}")
    require_hf_packages()
    loaded = load_workdir(workdir, step)
    cfg = loaded.model_cfg
    hf_mapping.check_exportable(cfg)
    ids = special_ids(loaded)
    out = Path(out)
    staging = _staging(out)
    try:
        _write_model(staging, loaded, ids, dtype, max_shard_bytes, shown=out)
        _install(staging, out)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _staging(out: Path) -> Path:
    """A new empty folder beside `out` (on its filesystem, so the export renames into place) to
    write the export in; the one a killed export left is removed first. Refuses an `out` that is
    a file, unwritable, or a folder of other files (no config.json: no model to replace)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ConfigError(
            f"--out {out}: holds files but no config.json, so no model an export replaces; give "
            "a new or empty folder"
        )
    staging = out.resolve().parent / f".{out.resolve().name}.exporting"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for folder in (out, out.parent):
            if folder.is_dir() and not os.access(folder, os.W_OK):
                raise PermissionError(errno.EACCES, "read-only", str(folder))
        if staging.exists():
            log.info("removing %s, left by an export that did not finish", staging)
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write in {e.filename} ({e.strerror})") from None
    return staging


def _install(staging: Path, out: Path) -> None:
    """Moves the finished export in `staging` to `out`: the folder renamed into place where
    `out` is new or empty; else each file replaces its namesake, a previous export's weights
    that it does not replace are removed (transformers would read them too), config.json moves
    last, and the files an export does not write stay."""
    out = out.resolve()  # a link's target: the folder `staging` was made beside
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        staging.rename(out)
        return
    new = sorted((p.name for p in staging.iterdir()), key=lambda name: name == "config.json")
    stale = [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]
    stale = [p for p in stale if p.exists() and p.name not in new]
    replaced = [name for name in new if (out / name).exists()]
    log.info("%s held a model: replacing %s", out, ", ".join(replaced + [p.name for p in stale]))
    for name in new[:-1]:  # the new files first, then the stale ones out, config.json last
        os.replace(staging / name, out / name)
    for old in stale:
        old.unlink()
    os.replace(staging / new[-1], out / new[-1])  # config.json


def _write_model(out: Path, loaded: Loaded, ids: dict, dtype: str, max_shard_bytes: int, *,
                 shown: Path) -> None:  # fmt: skip
    """The Hugging Face model folder's files, written into `out`; warnings name `shown`, the
    folder they will be moved to."""
    cfg = loaded.model_cfg
    config = hf_mapping.hf_config(cfg, bos=ids["bos"], eos=ids["eos"], pad=ids["pad"], dtype=dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # a chat reply ends at the next turn's <sep> or at <eos>: generation stops at either
    stops = [i for i in (ids["eos"], ids["sep"]) if i is not None]
    generation = {"bos_token_id": ids["bos"], "eos_token_id": stops, "pad_token_id": ids["pad"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = list(hf_mapping.hf_tensors(loaded.params, cfg))
    write_safetensors(tensors, out, dtype, max_shard_bytes)
    if loaded.tokenizer is not None:
        export_tokenizer(loaded.tokenizer, out, shown)
    else:
        log.warning("%s has no tokenizer: copy the original model's tokenizer files into %s",
                    loaded.directory, shown)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser("hanuman_jax.export", __doc__)
    parser.add_argument("--workdir", required=True, help="training run directory")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--out", required=True, help="directory for the Hugging Face model")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights' dtype (float16 for a T4)")  # fmt: skip
    args = parser.parse_args(argv)
    cli.setup_logging(fmt="%(levelname)s %(message)s")
    try:
        out = export(args.workdir, args.out, step=args.step, dtype=args.dtype)
    except (ConfigError, DataError) as e:
        return cli.fail(e)
    print(f"wrote a Hugging Face model ({args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
