"""Loss, perplexity and bits per byte of a model on text files.

python -m hanuman_jax.evaluate --workdir DIR --input FILE [FILE ...] [--seq-len N]

Each document is scored as training sees it: `<bos>` text `<eos>` (a chat: only the assistant's
tokens and the token that ends each reply). A document longer than the window is cut into
windows that overlap by one token, so every token but the first is predicted exactly once.
`loss` is the mean nats per predicted token; `bits_per_byte` is the total nats / ln 2 / UTF-8
bytes of the scored text (a chat: of the assistant's replies), comparable across tokenizers.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hanuman_jax import cli
from hanuman_jax.config import ConfigError, ModelConfig
from hanuman_jax.data import DataError, Document, read_documents, resolve_paths
from hanuman_jax.model import build
from hanuman_jax.model.attention import Kernel
from hanuman_jax.planning import targets
from hanuman_jax.planning.targets import local_target
from hanuman_jax.tokenizer import Tokenizer


def windows(ids: Sequence[int], mask: Sequence[int], length: int):
    """(tokens, target mask) windows of at most `length` tokens, overlapping by one token."""
    step = length - 1
    for start in range(0, max(len(ids) - 1, 1), step):
        yield ids[start : start + length], mask[start : start + length]


def _document(tokenizer: Tokenizer, doc: Document) -> tuple[list[int], list[int], int]:
    """ids, per-token loss mask and the scored text's UTF-8 bytes."""
    if doc.messages is None:
        ids = tokenizer.encode_document(doc.text)
        return ids, [1] * len(ids), len(doc.text.encode("utf-8"))
    ids, mask = tokenizer.encode_chat(doc.messages)
    scored = sum(len(m["content"].encode("utf-8")) for m in doc.messages
                 if m["role"] == "assistant")  # fmt: skip
    return ids, mask, scored


@functools.lru_cache(maxsize=8)
def _nll_fn(cfg: ModelConfig, kernel: Kernel | None):
    def nll(params, tokens_BT, segment_ids_BT, positions_BT, mask_BT):
        model = build.model_from_params(cfg, params, kernel)
        logits_BTV, _ = model(tokens_BT, segment_ids_BT, positions_BT)
        logits_BTV = logits_BTV[:, :-1]
        target_logit_BT = jnp.take_along_axis(logits_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
        nll_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit_BT
        keep_BT = mask_BT[:, 1:] & (segment_ids_BT[:, 1:] != 0)
        return jnp.sum(jnp.where(keep_BT, nll_BT, 0.0)), jnp.sum(keep_BT)

    return jax.jit(nll)


def evaluate(
    params: dict,
    model_cfg: ModelConfig,
    tokenizer: Tokenizer | str | Path,
    documents: Sequence[Document | str],
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
) -> dict:
    """loss (mean nats per predicted token), perplexity, bits_per_byte, tokens and bytes of the
    model with `params` (in memory, on any device or mesh) on `documents` (texts or Documents)."""
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    target = local_target()
    cfg = build.inference_config(model_cfg, target)
    length = seq_len or cfg.max_seq_len
    if not 2 <= length <= cfg.max_seq_len:
        raise ConfigError(
            f"--seq-len={length} is invalid: must be between 2 and the model's max_seq_len "
            f"({cfg.max_seq_len})"
        )
    rows, total_bytes = [], 0
    for doc in documents:
        doc = Document(text=doc) if isinstance(doc, str) else doc
        ids, mask, nbytes = _document(tokenizer, doc)
        rows += list(windows(ids, mask, length))
        total_bytes += nbytes
    fn = _nll_fn(cfg, targets.attention_kernel(cfg, target))
    nll, tokens = 0.0, 0
    for first in range(0, len(rows), batch_size):
        batch = np.zeros((4, batch_size, length), np.int32)  # tokens, segments, positions, mask
        for i, (ids, mask) in enumerate(rows[first : first + batch_size]):
            batch[:, i, : len(ids)] = [ids, np.ones(len(ids)), np.arange(len(ids)), mask]
        out = jax.device_get(fn(params, *batch[:3], batch[3].astype(bool)))
        nll, tokens = nll + float(out[0]), tokens + int(out[1])
    return summary(nll, tokens, total_bytes)


def _table(results: dict[str, dict]) -> str:
    header = f"{'input':<40} {'tokens':>9} {'bytes':>10} {'loss':>8} {'ppl':>10} {'bpb':>7}"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        lines.append(f"{name[-40:]:<40} {r['tokens']:>9} {r['bytes']:>10} {r['loss']:>8.4f} "
                     f"{r['perplexity']:>10.2f} {r['bits_per_byte']:>7.4f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser("hanuman_jax.evaluate", __doc__)
    parser.add_argument("--workdir", required=True, help="training run directory")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument(
        "--input", nargs="+", required=True, help="files or globs: .txt (a line each), .jsonl"
    )
    parser.add_argument("--seq-len", type=int, help="window length (default: max_seq_len)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    from hanuman_jax.checkpoint.restore import load_workdir

    try:
        loaded = load_workdir(args.workdir, args.step)
        if loaded.tokenizer is None:
            raise ConfigError(f"checkpoint {loaded.directory} has no tokenizer")
        tokenizer = Tokenizer(loaded.tokenizer)
        paths = [p for pattern in args.input for p in resolve_paths(pattern)]
        results = {}
        for path in paths:
            docs = read_documents(path)
            if not docs:
                raise DataError(f"--input {path}: no documents in it")
            results[str(path)] = evaluate(
                loaded.params, loaded.model_cfg, tokenizer, docs,
                seq_len=args.seq_len, batch_size=args.batch_size,
            )  # fmt: skip
    except (ConfigError, DataError) as e:
        return cli.fail(e)
    total = _total(results.values())
    print(_table({**results, "all": total} if len(results) > 1 else results))
    print(json.dumps({"step": loaded.step, **total}))
    return 0


def _total(results) -> dict:
    results = list(results)
    nll = sum(r["loss"] * r["tokens"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    nbytes = sum(r["bytes"] for r in results)
    return summary(nll, tokens, nbytes)


def summary(nll: float, tokens: int, nbytes: int) -> dict:
    """Mean nats per predicted token, its perplexity, and bits per UTF-8 byte of the text."""
    loss = nll / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
        "tokens": tokens,
        "bytes": nbytes,
    }


if __name__ == "__main__":
    sys.exit(main())
