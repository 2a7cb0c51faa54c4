"""The checks of scripts/device_checks.py, in the order they run, and the `env` check itself.

A check is one Python command run from the repo root: its arguments on a GPU, on a TPU (a check
without them does not run there) and, under --smoke, at tiny shapes on any backend (a CPU runs
every check). Two arguments are filled in as a check starts: DEVICE_FLAG, the memory planner's
--device for the device the env check found (dropped where the planner knows none such), and
WORKDIR, a fresh temporary run directory.

    python scripts/device_check_list.py    # the env check: two JSON lines
"""

from __future__ import annotations

import json
import re
import sys
import typing

DEVICE_FLAG = "<--device: the planner's name for this device>"
WORKDIR = "<workdir: a temporary run directory>"


class Check(typing.NamedTuple):
    name: str
    gpu: list[str] | None  # arguments after `python` on a GPU (None: not run there)
    tpu: list[str] | None  # the same on a TPU
    smoke: list[str]  # tiny shapes, any backend
    timeout_s: int

    def argv(self, platform: str, smoke: bool) -> list[str] | None:
        """Its arguments on `platform` (cpu: the GPU's; under --smoke every check's), or None."""
        full = self.tpu if platform == "tpu" else self.gpu
        if full is None and not (smoke and platform == "cpu"):
            return None
        return self.smoke if smoke else full


ENV = ["scripts/device_check_list.py"]
# the recipe's MoE at 8 layers, 8 x 4,096 tokens, no remat: one H100
MOE = ["--config", "configs/hanuman_1b_moe.py", "--config.model.num_layers=8",
       "--config.data.seq_len=4096", "--config.data.seq_len_schedule=[]",
       "--config.train.batch_size=8", "--config.model.remat=none"]  # fmt: skip
# on a TPU, the same 8 layers as configs/colab_tpu.py trains them (FSDP over every device, full
# remat, rows of 2,048), 16 rows a step in 2 micro-batches: a v2 core has 8 GiB, a v5e chip 16
TPU_MOE = ["--config", "configs/colab_tpu.py", "--config.model.num_layers=8",
           "--config.train.batch_size=16", "--config.train.grad_accum_steps=2"]  # fmt: skip
DENSE = ["--config", "configs/bench_dense_05b.py"]
# 8 rows of 2,048 with full remat: they divide over 1, 4 or 8 TPU devices and fit each
TPU_DENSE = [*DENSE, "--config.data.seq_len=2048", "--config.train.batch_size=8",
             "--config.model.remat=full"]  # fmt: skip
# the same configs at a size any CPU runs in seconds
TINY = ["--config.model.num_layers=1", "--config.model.d_model=64", "--config.model.num_heads=4",
        "--config.model.num_kv_heads=2", "--config.model.ffn_hidden=96",
        "--config.model.vocab_size=512", "--config.data.seq_len=64",
        "--config.data.seq_len_schedule=[]", "--config.train.batch_size=2"]  # fmt: skip
BENCH = ["scripts/bench_train.py", "--steps", "10", "--rounds", "2"]
SMOKE_BENCH = ["scripts/bench_train.py", "--steps", "1", "--rounds", "1"]
BLOCKED, XLA = "--config.model.moe.grouped_matmul=blocked", "--config.model.attention=xla"
ATTENTION = ["scripts/bench_attention.py", "--heads", "14", "--kv-heads", "2", "--head-dim", "64",
             "--blocks", "512", "--dtype", "bfloat16"]  # fmt: skip
SMOKE_ATTENTION = ["scripts/bench_attention.py", "--batch", "1", "--seq", "128", "--heads", "4",
                   "--kv-heads", "2", "--head-dim", "16", "--blocks", "32", "--rounds", "1",
                   "--kernels", "cudnn,splash"]  # fmt: skip
# the recipe's experts on the tokens of one micro-batch of the moe run (TPU: 8 x 2,048)
EXPERTS = ["scripts/bench_grouped_matmul.py", "--d-model", "896", "--hidden", "2560",
           "--experts", "8", "--block-size", "1024", "--dtype", "bfloat16"]  # fmt: skip
SMOKE_EXPERTS = ["scripts/bench_grouped_matmul.py", "--tokens", "256", "--d-model", "32",
                 "--hidden", "64", "--experts", "4", "--repeats", "1",
                 "--kernels", "blocked,ragged_dot,gmm,auto"]  # fmt: skip
PLAN = ["-m", "hanuman_jax.memory"]
# a preset's real run (python -m hanuman_jax.train: data pipeline, metrics.jsonl, a checkpoint
# at the end) cut to 2 layers and one row length, on the bundled sample corpus and tokenizer
PRESET = ["--workdir", WORKDIR, "--no-progress", "--config.model.num_layers=2",
          "--config.data.seq_len_schedule=[]", "--config.data.tokenizer=bundled:tokenizer.model",
          "--config.data.sources=[{'path': 'bundled:*.txt', 'weight': 1.0}]"]  # fmt: skip
PRESET_STEPS = ["--config.train.steps=6", "--config.train.log_every=2"]
SMOKE_PRESET = [*TINY, "--config.model.vocab_size=0", "--config.train.grad_accum_steps=1",
                "--config.train.steps=2", "--config.train.log_every=1"]  # fmt: skip


def preset(config: str) -> list[str]:
    """The train CLI on `config`, cut as PRESET says."""
    return ["-m", "hanuman_jax.train", "--config", config, *PRESET]


T4_PRESET, TPU_PRESET = preset("configs/t4_mini.py"), preset("configs/colab_tpu.py")

# fmt: off
CHECKS = (
    Check("env", ENV, ENV, ENV, 60),
    Check("attention", [*ATTENTION, "--batch", "4", "--seq", "4096", "--kernels", "cudnn"],
          [*ATTENTION, "--batch", "4", "--seq", "2048", "--kernels", "splash"], SMOKE_ATTENTION,
          90),
    Check("experts", [*EXPERTS, "--tokens", "32768", "--kernels", "blocked,ragged_dot,auto"],
          [*EXPERTS, "--tokens", "16384", "--kernels", "blocked,gmm,ragged_dot,auto"],
          SMOKE_EXPERTS, 90),
    Check("moe", [*BENCH, *MOE, "--compare-torch"], [*BENCH, *TPU_MOE],
          [*SMOKE_BENCH, *MOE, *TINY], 200),
    Check("plan", [*PLAN, *MOE, DEVICE_FLAG], [*PLAN, *TPU_MOE, DEVICE_FLAG],
          [*PLAN, *MOE, *TINY, "--device", "h100"], 90),
    Check("gpu_preset", [*T4_PRESET, *PRESET_STEPS], None, [*T4_PRESET, *SMOKE_PRESET], 150),
    Check("tpu_preset", None, [*TPU_PRESET, *PRESET_STEPS], [*TPU_PRESET, *SMOKE_PRESET], 180),
    Check("dense", [*BENCH, *DENSE, "--compare-torch"], [*BENCH, *TPU_DENSE],
          [*SMOKE_BENCH, *DENSE, *TINY], 200),
    Check("moe_blocked", [*BENCH, *MOE, BLOCKED], [*BENCH, *TPU_MOE, BLOCKED],
          [*SMOKE_BENCH, *MOE, *TINY, BLOCKED], 150),
    Check("moe_xla", [*BENCH, *MOE, XLA], [*BENCH, *TPU_MOE, XLA],
          [*SMOKE_BENCH, *MOE, *TINY, XLA], 150),
)
# fmt: on
KERNEL_CONFIGS = ("configs/hanuman_1b_moe.py", "configs/t4_mini.py", "configs/colab_tpu.py")


def planner_device(kind: str, count: int, platform: str) -> str | None:
    """The memory planner's name for `count` devices of `kind` (a jax device_kind), or None."""
    from hanuman_jax.planning.memory import DEVICES

    kind = kind.lower()
    if platform == "tpu":  # TPU v2 ... v4, v5 lite (v5e), v5 (v5p), v6 lite (v6e)
        family = re.search(r"v\d+[a-z]?", re.sub(r"v5$", "v5p", kind.replace(" lite", "e")))
        fits = lambda name: family is not None and name.split("-")[0] == family.group()
    else:  # Tesla T4, NVIDIA A100-SXM4-80GB, NVIDIA H100 80GB HBM3, ...
        fits = lambda name: all(part in kind for part in name.split("-"))
    names = [n for n, d in DEVICES.items()
             if d.target.platform == platform and d.devices == count and fits(n)]  # fmt: skip
    return max(names, key=len, default=None)


def environment() -> dict:
    """Backend, devices and versions: what every other check needs, from jax alone."""
    import flax
    import jax
    import optax

    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }


def kernels_here(env: dict) -> dict:
    """The device's compute capability (GPU) and name in the planner, and the kernels that each
    config's `model.attention` and `model.moe.grouped_matmul` (auto) resolve to on it."""
    from hanuman_jax.config import ModelConfig, load_config
    from hanuman_jax.planning import targets

    target = targets.local_target()
    kernels = {}
    for path in KERNEL_CONFIGS:
        model = ModelConfig.from_config(load_config(path).model)
        attention = targets.resolve_attention(model.attention, model.dtype, model.hd, target)
        kernels[path] = {"attention": attention,
                         "grouped_matmul": targets.grouped_matmul_impl(model, target)}  # fmt: skip
    device = planner_device(env["device_kind"], env["devices"], target.platform)
    return {"capability": target.capability, "planner_device": device, "kernels": kernels}


if __name__ == "__main__":  # two lines: the first stands where hanuman_jax fails to import
    env = environment()
    print(json.dumps(env), flush=True)
    print(json.dumps(kernels_here(env)))
