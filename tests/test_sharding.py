"""The logical-axis table on 8 simulated CPU devices (a subprocess: XLA_FLAGS must precede jax)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hanuman_jax.config import ConfigError, load_config
from hanuman_jax.sharding import logical_to_spec, mesh_shape

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from hanuman_jax import sharding
    from hanuman_jax.config import load_config
    from hanuman_jax.training.step import build_setup, init_state, jit_train_step

    START = {}

    def run(mesh_overrides, dispatch, devices=None):
        cfg = load_config("configs/tiny.py", ["--config.model.num_layers=1",
            "--config.model.vocab_size=4096", "--config.data.seq_len=32",
            "--config.train.batch_size=8", f"--config.model.moe.dispatch={dispatch}",
            "--config.model.moe.capacity_factor=2.0",  # 4 experts, top-2: nothing can drop
            "--config.mesh.data=1", *mesh_overrides])
        mesh = sharding.make_mesh(cfg.mesh, devices)
        setup = build_setup(cfg, mesh)
        # every run starts from the same values: created once, then laid out on each mesh
        if "state" not in START:
            START["state"] = jax.device_get(init_state(setup))
        state = jax.device_put(START["state"], setup.state_shardings)
        step = jit_train_step(setup)
        rng = np.random.default_rng(0)
        losses, dropped, all_to_all = [], [], None
        for _ in range(5):
            batch = {"tokens": rng.integers(0, 4096, (8, 32)).astype(np.int32),
                     "segment_ids": np.ones((8, 32), np.int32),
                     "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1)),
                     "loss_mask": np.ones((8, 32), np.int32)}
            batch = sharding.global_batch(batch, mesh)
            if all_to_all is None:  # does the step send tokens to their experts' devices?
                lowered = step.lower(state, batch)
                all_to_all = "all_to_all" in lowered.as_text()
                step = lowered.compile()  # traced and compiled once
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            dropped.append(float(metrics["moe/dropped/layer_00"]))
        layer = state["params"]["layers"][0]
        specs = {
            "w_gate": list(layer["moe"]["w_gate"].sharding.spec),
            "wq": list(layer["attn"]["wq"].sharding.spec),
            "embed": list(state["params"]["embed"].sharding.spec),
            "mu_w_gate": list(state["opt_state"][1][0].mu["layers"][0]["moe"]["w_gate"]
                              .sharding.spec),
            "w_gate_shard": list(layer["moe"]["w_gate"].addressable_shards[0].data.shape),
        }
        return {"losses": losses, "dropped": dropped, "specs": specs,
                "devices": mesh.devices.size, "all_to_all": all_to_all}

    MESHES = {
        "single": ([], jax.devices()[:1]),
        "data2_fsdp2_expert2": (["--config.mesh.fsdp=2", "--config.mesh.expert=2",
                                 "--config.mesh.data=2"], None),
        "fsdp8": (["--config.mesh.fsdp=8"], None),
        "data4_tensor2": (["--config.mesh.data=4", "--config.mesh.tensor=2"], None),
    }
    out = {f"{name}/{dispatch}": run(ov, dispatch, devices)
           for dispatch in ("dropless", "capacity") for name, (ov, devices) in MESHES.items()}
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_sharded_training_matches_one_device_for_both_dispatch_modes():
    """Five steps on three 8-device meshes equal one device, per step, within 1e-5 relative."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for dispatch in ("dropless", "capacity"):
        base = out[f"single/{dispatch}"]
        assert base["devices"] == 1 and base["dropped"] == [0.0] * 5
        for mesh in ("data2_fsdp2_expert2", "fsdp8", "data4_tensor2"):
            run = out[f"{mesh}/{dispatch}"]
            assert run["devices"] == 8
            # expert parallelism (moe_parallel) exactly where the mesh splits the experts
            assert run["all_to_all"] == (mesh == "data2_fsdp2_expert2"), (mesh, dispatch)
            for a, b in zip(run["losses"], base["losses"], strict=True):
                assert a == pytest.approx(b, rel=1e-5), (mesh, dispatch)
    # the two dispatch modes compute the same thing when nothing drops
    assert out["single/capacity"]["losses"] == pytest.approx(
        out["single/dropless"]["losses"], rel=1e-5
    )
    specs = out["data2_fsdp2_expert2/dropless"]["specs"]
    assert specs["w_gate"] == ["expert", "fsdp", "tensor"]  # (tensor is 1 here)
    assert specs["wq"] == ["fsdp", "tensor", None]
    assert specs["embed"] == ["tensor", "fsdp"]
    assert specs["mu_w_gate"] == specs["w_gate"]  # Adam moments are sharded like the params
    assert specs["w_gate_shard"] == [2, 64, 256]
    assert out["fsdp8/dropless"]["specs"]["w_gate_shard"] == [4, 16, 256]
    tensor = out["data4_tensor2/dropless"]["specs"]
    assert tensor["w_gate_shard"] == [4, 128, 128]  # heads and FFN hidden split over tensor


def test_mesh_shape_resolves_and_rejects():
    cfg = load_config(ROOT / "configs" / "tiny.py", ["--config.mesh.data=2"])
    cfg.mesh.unlock()
    cfg.mesh.fsdp = -1
    assert mesh_shape(cfg.mesh, 8) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="do not divide the 3 devices"):
        mesh_shape(cfg.mesh, 3)
    cfg.mesh.fsdp = 2
    with pytest.raises(ConfigError, match="multiply to 4 but there are 8 devices"):
        mesh_shape(cfg.mesh, 8)


def test_indivisible_parameter_dimension_is_one_clear_error():
    class FakeMesh:
        shape = {"data": 1, "fsdp": 3, "expert": 1, "tensor": 1}

    with pytest.raises(
        ConfigError,
        match=r"layers/0/w dimension 0 \(embed=128\) cannot be split over mesh "
        "fsdp=3",
    ):
        logical_to_spec(("embed", "mlp"), (128, 256), FakeMesh(), "layers/0/w")
