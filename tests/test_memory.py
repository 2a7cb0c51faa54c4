import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from hanuman_jax import sharding
from hanuman_jax.config import ConfigError, load_config
from hanuman_jax.planning import memory
from hanuman_jax.training.step import build_setup

DENSE = ["--config.model.moe.num_experts=0", "--config.model.ffn_hidden=384"]
CASES = {
    "tiny": ("tiny.py", []),
    "tiny_dense": ("tiny.py", DENSE),
    "bench_s_2_layers": (
        "bench_s.py",
        ["--config.model.num_layers=2", "--config.train.batch_size=4"],
    ),
    # the attention 128 query rows at a time: long rows without T x T scores
    "tiny_512_blockwise": (
        "tiny.py",
        [
            "--config.data.seq_len=512",
            "--config.train.batch_size=4",
            "--config.model.attention_block=128",
        ],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_plan_is_within_15_percent_of_xla(root, case):
    name, overrides = CASES[case]
    cfg = load_config(root / "configs" / name, ["--config.model.vocab_size=4096", *overrides])
    plan = memory.plan(cfg, num_devices=1)
    setup = build_setup(cfg, sharding.make_mesh(cfg.mesh))
    batch = memory._abstract_batch(cfg.train.batch_size, cfg.data.seq_len)
    compiled = memory.lower_train_step(setup, setup.abstract_state, batch).compile()
    xla_total, xla_temp = memory.xla_footprint(compiled)
    assert abs(plan.total / xla_total - 1) < 0.15, (plan, xla_total)
    # the part that is not simply the state: gradients and activations vs XLA's temporaries
    assert abs((plan.grads + plan.activations) / xla_temp - 1) < 0.15, (plan, xla_temp)


def _small(root, *extra):
    small = ["--config.model.vocab_size=512", "--config.model.num_layers=3"]
    return load_config(root / "configs" / "tiny.py", [*small, *extra])


def test_remat_plans_keep_less(root):
    acts = {}
    for remat in ("none", "save_matmuls", "full"):
        acts[remat] = memory.plan(_small(root, f"--config.model.remat={remat}"), 1).activations
    assert acts["full"] < acts["save_matmuls"] < acts["none"], acts
    assert acts["full"] < 0.6 * acts["none"], acts


def test_fsdp_plan_splits_state_and_batch(root):
    # dense: in the MoE each block copies its expert's weights, which does not scale with rows
    cfg = _small(root, *DENSE, "--config.mesh.data=1", "--config.mesh.fsdp=-1")
    one, eight = memory.plan(cfg, 1), memory.plan(cfg, 8)
    assert eight.mesh["fsdp"] == 8 and eight.micro_batch == cfg.train.batch_size // 8
    assert eight.params == one.params // 8 and eight.grads == one.grads // 8  # all have `embed`
    assert one.opt_state / 8 <= eight.opt_state < one.opt_state / 7  # + AdamW's step counts
    assert one.activations / 9 < eight.activations < one.activations / 7


def test_cli_says_whether_it_fits(root, capsys):
    config = str(root / "configs" / "tiny.py")
    assert memory.main(["--config", config, "--device", "v5e-8"]) == 0
    out = capsys.readouterr().out
    assert "'data': 8" in out and "v5e-8: fits" in out
    assert memory.main(["--config", config, "--device", "t4", "--config.train.batch_size=4096",
                        "--config.model.vocab_size=96000"]) == 0  # fmt: skip
    assert "t4: does NOT fit" in capsys.readouterr().out
    assert memory.main(["--config", config, "--device", "v2-8",
                        "--config.train.batch_size=12"]) == 2  # fmt: skip
    assert "train.batch_size=12 is invalid" in capsys.readouterr().err


@pytest.mark.parametrize(("preset", "device"), [("t4_mini", "t4"), ("colab_tpu", "v2-8")])
def test_presets_fit_their_hardware(root, capsys, preset, device):
    """configs/t4_mini.py fits a 16 GB T4 in float16, configs/colab_tpu.py the 8 GiB cores of a
    TPU v2-8 (the smaller of the two Colab TPUs), by the planner."""
    config = str(root / "configs" / f"{preset}.py")
    assert memory.main(["--config", config, "--device", device]) == 0
    assert f"{device}: fits" in capsys.readouterr().out


def test_usable_gpu_memory_follows_jax_preallocation(monkeypatch):
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    h100 = 81_559 * 2**20  # nvidia-smi's MiB
    assert memory.usable_bytes("h100") == int(h100 * 0.75)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # the older name
    assert memory.usable_bytes("h100") == int(h100 * 0.5)
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.9")  # the newer name wins (jaxlib: both
    # at once is an error)
    assert memory.usable_bytes("h100") == int(h100 * 0.9)
    assert memory.usable_bytes("v5e-8") == 16 * 2**30  # TPUs: all of it


def test_colab_single_chip_tpus_are_targets():
    """Colab's one-chip TPU runtimes, with the HBM of their chips in the 8-chip slices."""
    for name, devices, gib in [("v5e-1", 1, 16), ("v6e-1", 1, 32), ("v5e-8", 8, 16),
                               ("v6e-8", 8, 32), ("v2-8", 8, 8)]:  # fmt: skip
        device = memory.DEVICES[name]
        assert (device.devices, device.hbm, device.target.platform) == (devices, gib << 30, "tpu")
    assert memory.usable_bytes("v6e-1") == 32 << 30  # TPUs: all of it


# configs/colab_tpu.py on 1 and 8 of 8 simulated devices: the mesh, the micro-batch per device,
# and v5e-1's overrides (docs/colab.md), which fit one chip only
COLAB_MESH = textwrap.dedent(
    """
    import json
    import jax
    from hanuman_jax import sharding
    from hanuman_jax.config import ConfigError, load_config
    from hanuman_jax.planning.targets import Target
    from hanuman_jax.training.step import build_setup

    V5E_1 = ["--config.model.param_dtype=bfloat16", "--config.train.grad_accum_steps=64"]
    out = {}
    for name, overrides in (("preset", []), ("v5e-1", V5E_1)):
        cfg = load_config("configs/colab_tpu.py", ["--config.model.num_layers=2", *overrides])
        for n in (1, 8):
            try:
                setup = build_setup(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:n]),
                                    Target("tpu"))
            except ConfigError as e:
                out[f"{name}/{n}"] = str(e)
                continue
            shards = sharding.batch_shards(setup.mesh) * setup.grad_accum_steps
            out[f"{name}/{n}"] = {"mesh": dict(setup.mesh.shape),
                                  "micro_batch": cfg.train.batch_size // shards}
    print("RESULT" + json.dumps(out))
    """
)


def test_colab_tpu_mesh_takes_the_devices_found(root):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", COLAB_MESH], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    rest = {"data": 1, "expert": 1, "tensor": 1}
    assert out["preset/8"] == {"mesh": {**rest, "fsdp": 8}, "micro_batch": 1}  # v2-8, v5e-8
    assert out["preset/1"] == {"mesh": {**rest, "fsdp": 1}, "micro_batch": 8}  # v5e-1, v6e-1
    assert out["v5e-1/1"] == {"mesh": {**rest, "fsdp": 1}, "micro_batch": 1}
    assert "train.grad_accum_steps=64 is invalid" in out["v5e-1/8"]


@pytest.mark.parametrize(
    "overrides",
    [[], ["--config.model.tie_embeddings=false", "--config.model.head_dim=24", *DENSE]],
    ids=["moe_tied", "dense_untied_head_dim"],
)
def test_param_count_in_closed_form_is_the_models(root, overrides):
    from hanuman_jax.config import ModelConfig
    from hanuman_jax.model.build import count_params

    cfg = ModelConfig.from_config(_small(root, "--config.model.num_heads=2", *overrides).model)
    assert memory.param_count(cfg) == count_params(cfg)["total"]


@pytest.mark.parametrize(
    "overrides",
    [[],
     ["--config.model.remat=full", "--config.model.param_dtype=bfloat16",
      "--config.model.dtype=bfloat16"],
     [*DENSE, "--config.mesh.data=1", "--config.mesh.fsdp=-1",
      "--config.train.grad_accum_steps=2"]],
    ids=["plain", "remat_bf16", "fsdp_accum"],
)  # fmt: skip
def test_floor_is_under_the_plan(root, monkeypatch, overrides):
    """check_fits passes a device that holds what the planner plans, and refuses one of a tenth
    of that: its floor is below the plan, and not orders of magnitude below."""
    cfg = _small(root, *overrides)
    total = memory.plan(cfg, 8).total
    monkeypatch.setattr(memory, "_this_device_bytes", lambda: 0)  # not this host's RAM
    for hbm, fits in ((total, True), (total // 10, False)):
        monkeypatch.setattr(memory, "DEVICES", {"x": memory.Device(1, hbm, memory.Target("gpu"))})
        if fits:
            memory.check_fits(cfg, 8)
        else:
            with pytest.raises(ConfigError, match=r"at least .* more than the largest, x's"):
                memory.check_fits(cfg, 8)
    # a device bigger than any the planner knows runs what fits it
    monkeypatch.setattr(memory, "_this_device_bytes", lambda: total)
    memory.check_fits(cfg, 8)


@pytest.mark.parametrize(
    ("override", "says"),
    [("model.num_layers=100000", "num_layers=100000, d_model=128"),
     ("model.d_model=10000000", "num_layers=4, d_model=10000000"),
     ("train.batch_size=1000000000", "train.batch_size=1000000000, data.seq_len=128")],
)  # fmt: skip
def test_absurd_sizes_are_refused_before_anything_is_built(root, tmp_path, override, says):
    """A typo's size is one line in seconds (each ran until killed, or died in XLA, before)."""
    cmd = [sys.executable, "-m", "hanuman_jax.train", "--config", "configs/tiny.py",
           "--workdir", str(tmp_path), "--no-progress", f"--config.{override}"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert says in errors[0] and "cannot train on any device the planner knows" in errors[0]
    assert re.search(
        r"needs at least [\d.]+ GiB .* h200's 140.40 GiB, and this device's", errors[0]
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "checkpoints").exists()
