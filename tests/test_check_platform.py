"""`--check-platform`: the train, evaluation and generation steps of the presets lower for TPU and
CUDA on this CPU, on abstract devices, and what cannot lower is one line naming the part."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest
from conftest import ROOT

from hanuman_jax import train
from hanuman_jax.config import ConfigError, load_config
from hanuman_jax.planning import check_platform as cp

CUT = ("--config.model.num_layers=2", "--config.model.vocab_size=101")  # a quick odd-sized check
PARTS = ("train step", "eval step", "generation")


def _check(config: str, platform: str, *overrides: str, devices: int | None = None):
    cfg = load_config(str(ROOT / "configs" / f"{config}.py"), [*CUT, *overrides])
    return cp.check_platform(cfg, platform, devices)


def _ops(exported) -> str:
    """The lowered module's operations, without the source locations (which name this file)."""
    lines = exported.mlir_module().splitlines()
    return "\n".join(
        re.sub(r" loc\(.*$", "", line) for line in lines if not line.startswith("#loc")
    )


def _metrics(exported) -> dict:
    """The train step's metrics, as abstract values."""
    return jax.tree.unflatten(exported.out_tree, exported.out_avals)[1]


def test_cli_prints_one_json_line():
    cmd = [sys.executable, "-m", "hanuman_jax.train", "--config", "tiny", "--check_platform",
           "cuda", "--check-devices", "3", "--config.train.batch_size=9", *CUT]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    lines = out.stdout.splitlines()
    assert len(lines) == 1, out.stdout
    report = json.loads(lines[0])
    assert list(report) == ["platform", "devices", "mesh", "attention", "grouped_matmul",
                            "lowered_bytes", "ok"]  # fmt: skip
    assert report["platform"] == "cuda" and report["devices"] == 3 and report["ok"] is True
    assert report["mesh"] == {"data": 3, "fsdp": 1, "expert": 1, "tensor": 1}
    assert report["attention"] == "xla"  # float32: cuDNN would not run it on any GPU
    assert report["grouped_matmul"] == "ragged_dot"
    assert set(report["lowered_bytes"]) == set(PARTS)
    assert all(n > 1000 for n in report["lowered_bytes"].values())


def test_tpu_lowers_splash_and_gmm_on_one_device():
    report, exports = _check("tiny", "tpu", devices=1)
    assert (report["attention"], report["grouped_matmul"]) == ("splash", "gmm")
    assert report["mesh"] == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    for part in PARTS:
        assert exports[part].platforms == ("tpu",)
    assert "tpu_custom_call" in _ops(exports["train step"])  # the Pallas kernels, lowered


@pytest.mark.parametrize(
    ("config", "mesh"),
    [
        ("tiny", {"data": 8, "fsdp": 1}),
        ("colab_tpu", {"data": 1, "fsdp": 8}),
        ("hanuman_1b_moe", {"data": 1, "fsdp": 8}),
    ],  # fmt: skip
)
def test_tpu_presets_lower_on_eight_devices(config, mesh):
    report, exports = _check(config, "tpu")
    assert report["devices"] == 8 and report["mesh"] == mesh | {"expert": 1, "tensor": 1}
    assert exports["train step"].nr_devices == 8
    assert exports["generation"].nr_devices == 1  # generation runs on one device
    # gmm runs per device on its rows (shard_map), splash per device on its rows and heads
    assert (report["attention"], report["grouped_matmul"]) == ("splash", "gmm")
    assert "tpu_custom_call" in _ops(exports["train step"])


def test_tpu_splash_falls_back_and_says_so():
    report, exports = _check("tiny", "tpu", "--config.data.seq_len=96",
                             "--config.model.moe.num_experts=0", devices=1)  # fmt: skip
    assert report["attention"] == "splash (xla for rows of 96 tokens, no multiple of 128)"
    assert report["grouped_matmul"] is None  # dense
    assert "tpu_custom_call" not in _ops(exports["train step"])


def test_cuda_checks_cudnn_as_xla():
    report, exports = _check("hanuman_1b_moe", "cuda")
    assert report["attention"] == cp.CUDNN_STAND_IN
    assert report["grouped_matmul"] == "ragged_dot" and report["devices"] == 1
    ops = _ops(exports["train step"])
    assert "cudnn" not in ops and "ragged_dot" in ops


def test_t4_mini_lowers_float16_with_loss_scaling():
    report, exports = _check("t4_mini", "cuda")
    assert report["attention"] == "xla" and report["ok"]
    assert exports["train step"].platforms == ("cuda",)
    assert "xf16>" in _ops(exports["train step"])
    assert "loss_scale" in _metrics(exports["train step"])  # float16: the dynamic loss scale
    assert "loss_scale" not in _metrics(
        _check("t4_mini", "cuda", "--config.model.dtype=bfloat16")[1]["train step"]
    )


def test_unlowerable_kernel_names_the_part(monkeypatch):
    monkeypatch.setattr(cp, "_stand_in", lambda setup: setup)  # cuDNN itself, not XLA for it
    with pytest.raises(ConfigError, match=r"^the train step does not lower for cuda "
                       r"\(attention=cudnn, grouped_matmul=ragged_dot\): .*cuDNN"):  # fmt: skip
        _check("hanuman_1b_moe", "cuda")


def test_cli_sharding_that_does_not_divide(capsys):
    argv = ["--config", "tiny", "--check-platform", "tpu", "--check-devices", "3", *CUT]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: config train.batch_size=16 is invalid: it is split 3 ways by the mesh "
        "{'data': 3, 'fsdp': 1, 'expert': 1, 'tensor': 1}; use a multiple of 3"
    ]


def test_check_devices_needs_check_platform(capsys):
    with pytest.raises(SystemExit):
        train.main(["--config", "tiny", "--check-devices", "2"])
    assert "--check-devices only applies with --check-platform" in capsys.readouterr().err
