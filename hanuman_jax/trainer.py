"""The training loop: data, sharded state, checkpoints and logging around the jitted step."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import ml_collections

from hanuman_jax import sharding
from hanuman_jax.checkpoint import Checkpointer, abstract_with_shardings
from hanuman_jax.config import ConfigError
from hanuman_jax.data import make_dataset, resolve_file
from hanuman_jax.metrics import MetricsWriter, ProgressBar
from hanuman_jax.model import count_params
from hanuman_jax.step import build_setup, init_state, jit_train_step
from hanuman_jax.tokenizer import Tokenizer

log = logging.getLogger("hanuman_jax")


def prepare_workdir(workdir: Path) -> None:
    """Fails now, not at the first save hours later, if the workdir cannot be written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable: {e.strerror}") from None


def load_tokenizer(cfg: ml_collections.ConfigDict) -> Tokenizer:
    try:
        tokenizer = Tokenizer(resolve_file(cfg.data.tokenizer))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config data.tokenizer={cfg.data.tokenizer!r} is invalid: {e}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"config model.vocab_size={cfg.model.vocab_size} is invalid: the tokenizer "
            f"{tokenizer.path.name} has {tokenizer.vocab_size} pieces; use at least that"
        )
    return tokenizer


def train(cfg: ml_collections.ConfigDict, workdir: Path, *, progress: bool = True) -> dict:
    """Trains to `train.steps`, resuming from the newest checkpoint in `workdir`; returns the last
    logged metrics."""
    prepare_workdir(workdir)
    tokenizer = load_tokenizer(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    setup = build_setup(cfg, mesh)
    counts = count_params(setup.model_cfg)
    log.info(
        "model: %s parameters, %s active per token; mesh %s",
        f"{counts['total']:,}",
        f"{counts['active']:,}",
        dict(mesh.shape),
    )
    (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")

    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
    batches = iter(
        make_dataset(
            cfg,
            tokenizer.path,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    )
    data_key = f"data_{jax.process_index()}"
    start = ckpt.latest_step() or 0
    if start:
        target = abstract_with_shardings(setup.abstract_state, setup.state_shardings)
        state, meta = ckpt.restore(start, target)
        batches.set_state(meta[data_key])
        log.info("resumed from %s at step %d", ckpt.directory / str(start), start)
    else:
        state = init_state(setup)

    step_fn = jit_train_step(setup)
    writer = MetricsWriter(workdir, resume_step=start)
    bar = ProgressBar(cfg.train.steps, start, enabled=progress)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    last: dict = {}
    pending = None  # (step, device metrics): read one step late so the host never waits
    t_mark, step_mark = time.perf_counter(), start

    def report(step: int, metrics) -> None:
        nonlocal t_mark, step_mark, last
        bar.update(step)
        is_first = step == start + 1
        if not (is_first or step % cfg.train.log_every == 0 or step == cfg.train.steps):
            return
        now = time.perf_counter()
        values = jax.device_get(metrics)
        values["tokens_per_s"] = tokens_per_step * (step - step_mark) / (now - t_mark)
        t_mark, step_mark = now, step
        writer.write(step, values)
        bar.update(step, float(values["loss"]), values["tokens_per_s"])
        last = {"step": step, **{k: float(v) for k, v in values.items()}}

    for step in range(start, cfg.train.steps):
        batch = sharding.global_batch(next(batches), mesh)
        state, metrics = step_fn(state, batch)
        if pending is not None:
            report(*pending)
        pending = (step + 1, metrics)
        if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == cfg.train.steps:
            ckpt.save(step + 1, state, {data_key: batches.get_state(), "config": cfg.to_dict()})
    if pending is not None:
        report(*pending)
    batches.close()  # stops the prefetch thread before interpreter shutdown
    ckpt.close()
    writer.close()
    bar.close()
    if last:
        log.info("finished at step %d: %s", last["step"], json.dumps(last))
    return last
