"""Export a checkpoint as a Hugging Face model: python -m hanuman_jax.export --workdir DIR --out OUT

MoE models become `MixtralForCausalLM`, dense ones `LlamaForCausalLM` (the mapping and what it
refuses: hf_mapping.py). OUT gets `config.json`, `generation_config.json`, `model.safetensors`
(or shards of at most 2 GB and `model.safetensors.index.json`) in the per-expert layout that
transformers 4.x and 5.x, vLLM and TRL load, and the tokenizer files of `tokenizer export-hf`.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from hanuman_jax import cli
from hanuman_jax.checkpoint.restore import Loaded, load_workdir
from hanuman_jax.config import ConfigError
from hanuman_jax.data import DataError
from hanuman_jax.hf import mapping as hf_mapping

DTYPES = ("float32", "float16", "bfloat16")
MAX_SHARD_BYTES = 2 * 1024**3
log = logging.getLogger("hanuman_jax")


def require_export_extra() -> None:
    """Stops before anything is written when the `export` extra (torch, safetensors, tokenizers)
    is not installed."""
    try:
        import safetensors  # noqa: F401
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"the Hugging Face export and import need the export extra ({e}): "
            "pip install -c constraints.txt -e '.[export]' (or pip install 'hanuman-jax[export]')"
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


def write_safetensors(tensors: list, out: Path, dtype: str, max_shard_bytes: int) -> list[Path]:
    """Writes (name, loader, shape) tensors as safetensors in `dtype`, one shard in memory at a
    time; shards and an index when they exceed `max_shard_bytes`."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
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
            data[name] = torch.from_numpy(loader().copy()).to(torch_dtype).contiguous()
            weight_map[name] = filename
            total += data[name].numel() * itemsize
        save_file(data, str(out / filename), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out / n for n in names]


def export_tokenizer(tokenizer_path: Path, out: Path) -> None:
    """The `tokenizer export-hf` files; a tokenizer not trained by us (an imported model's) is
    copied as `tokenizer.model` only, with a warning."""
    from hanuman_jax.tokenizer.hf import export_hf

    try:
        export_hf(tokenizer_path, out)
    except ValueError as e:
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
        log.warning(
            "tokenizer %s copied as tokenizer.model only (%s); put the original model's "
            "tokenizer files into %s for AutoTokenizer",
            tokenizer_path, str(e).splitlines()[0], out,
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
    require_export_extra()
    loaded = load_workdir(workdir, step)
    cfg = loaded.model_cfg
    hf_mapping.check_exportable(cfg)
    ids = special_ids(loaded)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror})") from None
    config = hf_mapping.hf_config(cfg, bos=ids["bos"], eos=ids["eos"], pad=ids["pad"], dtype=dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # a chat reply ends at the next turn's <sep> or at <eos>: generation stops at either
    stops = [i for i in (ids["eos"], ids["sep"]) if i is not None]
    generation = {"bos_token_id": ids["bos"], "eos_token_id": stops, "pad_token_id": ids["pad"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a previous export's shards would be read with the new ones
    tensors = list(hf_mapping.hf_tensors(loaded.params, cfg))
    write_safetensors(tensors, out, dtype, max_shard_bytes)
    if loaded.tokenizer is not None:
        export_tokenizer(loaded.tokenizer, out)
    else:
        log.warning("%s has no tokenizer: copy the original model's tokenizer files into %s",
                    loaded.directory, out)  # fmt: skip
    return out


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
