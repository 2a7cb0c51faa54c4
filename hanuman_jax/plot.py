"""Loss, learning rate and throughput of a run, from WORKDIR/metrics.jsonl to WORKDIR/metrics.png.

python -m hanuman_jax.plot --workdir DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display needed, and none is opened
import matplotlib.pyplot as plt  # noqa: E402

from hanuman_jax import cli  # noqa: E402
from hanuman_jax.training.workdir import jsonl_rows  # noqa: E402


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Train rows and evaluation rows; a line a killed run left torn is skipped."""
    train, evals = [], []
    for _, row in jsonl_rows(path.read_bytes()):
        if "eval_loss" in row:
            evals.append(row)
        elif "loss" in row:
            train.append(row)
    return train, evals


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _length_changes(rows: list[dict]) -> list[tuple[int, int]]:
    """(the last logged step before it, seq_len) of each sequence length after the first."""
    steps, lengths = _series(rows, "seq_len")
    return [(s, n) for s, n, before in zip(steps, lengths[1:], lengths, strict=False)
            if n != before]  # fmt: skip


def plot(workdir: Path) -> Path:
    """Writes metrics.png next to metrics.jsonl and returns its path."""
    source = workdir / "metrics.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file (is --workdir a training run?)")
    train, evals = read_metrics(source)
    if not train:
        raise ValueError(f"{source} has no training rows yet")
    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    ax_loss.plot(*_series(train, "loss"), label="train")
    if evals:
        ax_loss.plot(*_series(evals, "eval_loss"), "o-", label="held-out (eval_loss)")
    ax_loss.set(title="loss (nats per token)", xlabel="step")
    ax_loss.legend()
    ax_lr.plot(*_series(train, "lr"))
    ax_lr.set(title="learning rate", xlabel="step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    # The first row includes compilation: leave it out.
    steps, speeds = _series(train[1:] if len(train) > 1 else train, "tokens_per_s")
    ax_speed.plot(steps, speeds)
    ax_speed.set(title="throughput (tokens/s)", xlabel="step")
    # A window around a checkpoint save can read far off the steady rate: keep the scale on it.
    typical = float(np.median(speeds)) if speeds else 0.0
    ax_speed.set_ylim(0, 2 * typical if speeds and max(speeds) > 3 * typical else None)
    for step, length in _length_changes(train):  # data.seq_len_schedule's phases
        for ax in (ax_loss, ax_lr, ax_speed):
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
        ax_loss.annotate(f"{length}", (step, 1), xycoords=("data", "axes fraction"),
                         va="top", fontsize=8, color="grey")  # fmt: skip
    fig.suptitle(str(workdir))
    out = workdir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser("hanuman_jax.plot", __doc__)
    parser.add_argument("--workdir", required=True, help="a training run's directory")
    args = parser.parse_args(argv)
    try:
        print(plot(Path(args.workdir)))
    except (FileNotFoundError, ValueError) as e:
        return cli.fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
