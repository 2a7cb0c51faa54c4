"""What an accelerator user sees: the compilation cache a resume loads from, MFU and peak memory."""

import json
import logging
import shutil
from pathlib import Path

import jax
import pytest
from conftest import small_model_cfg
from test_hooks import _stats

from hanuman_jax.config import load_config
from hanuman_jax.data.schedule import SeqLenSchedule
from hanuman_jax.model.build import train_flops_per_token
from hanuman_jax.training.hooks import MetricsLog, Run
from hanuman_jax.training.loop import train
from hanuman_jax.training.metrics import MetricsWriter, ProgressBar
from hanuman_jax.training.utilization import GiB, Utilization, devices_peak, memory_peak

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--config.model.num_layers=1", "--config.model.d_model=32", "--config.data.seq_len=32",
         "--config.train.batch_size=2", "--config.train.steps=2",
         "--config.train.checkpoint_every=1")  # fmt: skip


class FakeDevice:
    """What Utilization reads of a jax.Device: its kind, process and memory statistics."""

    def __init__(self, kind: str, peak: int | None = None, limit: int = 80 * GiB):
        self.device_kind, self.process_index = kind, 0
        self.stats = None if peak is None else {"peak_bytes_in_use": peak, "bytes_limit": limit}

    def memory_stats(self):
        return self.stats


def test_mfu_is_model_flops_over_the_mesh_datasheet_peak():
    model = small_model_cfg(dtype="bfloat16")  # float32 would be rated at TF32's 495e12
    h100s = [FakeDevice("NVIDIA H100 80GB HBM3", peak=p * GiB) for p in (3, 7, 5)]
    figures = Utilization(model, h100s).row(tokens_per_s=2.0e6, seq_len=64)
    flops = train_flops_per_token(model, 64)
    assert figures["mfu"] == pytest.approx(2.0e6 * flops / (3 * 989e12))
    assert figures["peak_memory_gib"] == pytest.approx(7.0)  # the fullest device's
    assert figures["memory_fraction"] == pytest.approx(7 / 80)
    # PCIe H100s have their own, lower peak; a T4 in bfloat16 runs at its fp32 rate
    assert devices_peak([FakeDevice("NVIDIA H100 PCIe")], "bfloat16") == pytest.approx(756e12)
    assert devices_peak([FakeDevice("Tesla T4")], "bfloat16") == pytest.approx(8.1e12)
    assert devices_peak([FakeDevice("TPU v5 lite")] * 8, "bfloat16") == pytest.approx(8 * 197e12)


def test_a_cpu_reports_neither_mfu_nor_memory():
    cpus = jax.devices()
    assert devices_peak(cpus, "float32") is None and memory_peak(cpus) is None
    assert Utilization(small_model_cfg(), cpus).row(1e4, 64) == {}
    # one unlisted device among listed ones: no MFU rather than a wrong one
    assert devices_peak([FakeDevice("NVIDIA H100"), FakeDevice("cpu")], "bfloat16") is None


def test_metrics_rows_carry_mfu_and_memory(tmp_path):
    writer = MetricsWriter(tmp_path)
    bar = ProgressBar(4, 0, enabled=False)
    gpu = [FakeDevice("NVIDIA A100-SXM4-40GB", peak=12 * GiB, limit=40 * GiB)]
    utilization = Utilization(small_model_cfg(), gpu)
    metrics = MetricsLog(writer, bar, SeqLenSchedule(64, ((0, 64),)), start=0, end=4, every=2,
                         tokens_per_step=256, utilization=utilization)  # fmt: skip
    run = Run(state={}, step=0, saved=0)
    for step in range(1, 5):
        run.step = step
        metrics.push(run, {"loss": 1.0, "nonfinite_in_a_row": 0}, _stats(100))
    metrics.flush(run)
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4]
    assert all(r["mfu"] > 0 and r["memory_fraction"] == pytest.approx(0.3) for r in rows)
    postfix = bar.bar.postfix
    assert "mfu=" in postfix and "mem=12.0GiB" in postfix, postfix


@pytest.fixture
def cache_writes_every_program():
    """JAX caches only programs that took 1 s to compile; this test's compile in less."""
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


@pytest.mark.usefixtures("cache_writes_every_program")
def test_a_resumed_run_loads_its_train_step_from_the_workdir_cache(tmp_path, caplog):
    assert not jax.config.jax_compilation_cache_dir  # no cache set for the whole process
    cfg = load_config(ROOT / "configs" / "tiny.py", SMALL)
    workdir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="hanuman_jax"):
        train(cfg, workdir, progress=False)
        assert "step 0: the train step compiled in" in caplog.text
        assert any((workdir / "compilation_cache").iterdir())
        shutil.rmtree(workdir / "checkpoints" / "2")  # as if the runtime died after step 1
        caplog.clear()
        train(cfg, workdir, progress=False)
    assert "step 1: the train step loaded from the compilation cache in" in caplog.text
    assert not jax.config.jax_compilation_cache_dir  # the process's setting is put back

    off = load_config(ROOT / "configs" / "tiny.py", [*SMALL, "--config.train.compilation_cache="])
    train(off, tmp_path / "off", progress=False)
    assert not (tmp_path / "off" / "compilation_cache").exists()
