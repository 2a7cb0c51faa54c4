import pytest

from hanuman_jax import sharding
from hanuman_jax.config import load_config
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
