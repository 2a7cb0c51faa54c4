"""Run logging: `metrics.jsonl`, TensorBoard event files and the console progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from hanuman_jax.training.workdir import jsonl_rows


def _plain(value):
    value = np.asarray(value).item() if np.ndim(value) == 0 else value
    return float(value) if isinstance(value, (float, np.floating)) else value


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: Path, *, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled  # one writer per run: only process 0 writes
        if not enabled:
            return
        self.path = workdir / "metrics.jsonl"
        _truncate_after(self.path, resume_step)
        _truncate_after(self.path.with_name("samples.jsonl"), resume_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        # purge_step hides events a killed run logged after the checkpoint we resumed from
        self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict, *, section: str = "train") -> None:
        """One row; TensorBoard gets the scalars under `section/` ('data/...' keys as they are)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                tag = key if "/" in key else f"{section}/{key.removeprefix(section + '_')}"
                self.tb.add_scalar(tag, value, step)

    def write_samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        """Sample generations: rows of `samples.jsonl`, and text in TensorBoard."""
        if not self.enabled:
            return
        with open(self.path.with_name("samples.jsonl"), "a", encoding="utf-8") as f:
            for prompt, text in samples:
                f.write(json.dumps({"step": step, "prompt": prompt, "text": text},
                                   ensure_ascii=False) + "\n")  # fmt: skip
        for i, (prompt, text) in enumerate(samples):
            self.tb.add_text(f"samples/{i}", f"{prompt} **→** {text}", step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop rows logged after the restored checkpoint (they are about to be redone)
    and what a killed process left torn, so that the next row starts a line of its own."""
    if not path.exists():
        return
    data = path.read_bytes()
    kept = b"".join(line + b"\n" for line, row in jsonl_rows(data) if row["step"] <= step)
    if kept != data:
        path.write_bytes(kept)


class ProgressBar:
    """tqdm bar showing step, loss, tokens/s, MFU and peak device memory (where known), the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.bar = tqdm.tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True
        )

    def update(self, step: int, row: dict | None = None):
        """Advances to `step`; `row`: a metrics row to show."""
        self.bar.update(step - self.bar.n)
        if row is not None:
            shown = {"loss": f"{float(row['loss']):.4f}", "tok_s": f"{row['tokens_per_s']:,.0f}"}
            if "mfu" in row:
                shown["mfu"] = f"{row['mfu']:.1%}"
            if "peak_memory_gib" in row:
                shown["mem"] = f"{row['peak_memory_gib']:.1f}GiB"
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self.bar.close()
