"""The Colab notebooks: valid nbformat 4 with an "Open in Colab" badge, and code cells that run in
order on CPU with HANUMAN_SMOKE=1 (the tiny preset, a few steps, no Drive).

Neither nbformat nor IPython is a test dependency: the schema's essentials are checked here, and
a notebook's code cells run as one Python script in a subprocess, each `!cmd` line becoming a
shell call after IPython's `{expression}` expansion and each `%` magic skipped (the cells use
magics only on Colab or in a notebook kernel).
"""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hanuman_jax.planning.memory import DEVICES

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "OWNER-PLACEHOLDER/hanuman_jax"  # the repository's GitHub address, unknown here
NOTEBOOKS = {  # name: (pip extra, preset)
    "colab_t4": ("cuda12", "configs/t4_mini.py"),
    "colab_tpu": ("tpu", "configs/colab_tpu.py"),
}
REQUIRED_KEYS = {  # a cell's keys in nbformat 4.5 (markdown cells may add "attachments")
    "markdown": {"cell_type", "id", "metadata", "source"},
    "code": {"cell_type", "id", "metadata", "source", "outputs", "execution_count"},
}


def load(name: str) -> dict:
    return json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8"))


def sources(nb: dict, kind: str) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def to_python(cell: str) -> str:
    """A code cell as plain Python: `!cmd` runs `cmd` in a shell, `%magic` does nothing."""
    lines = []
    for line in cell.splitlines():
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        if body.startswith("!"):
            assert not body.endswith("\\"), f"continued shell line: {line}"
            lines.append(f"{indent}_shell(f{body[1:]!r})")  # IPython expands {expr} the same way
        elif body.startswith("%"):
            lines.append(f"{indent}pass  # {body}")
        else:
            lines.append(line)
    return "\n".join(lines)


def script(nb: dict) -> str:
    prelude = (
        "import subprocess\n\n\ndef _shell(cmd):\n"
        "    print('$', cmd, flush=True)\n    subprocess.run(cmd, shell=True, check=True)\n"
    )
    cells = [f"print('# cell {i}', flush=True)\n{to_python(src)}"
             for i, src in enumerate(sources(nb, "code"))]  # fmt: skip
    return "\n\n".join([prelude, *cells]) + "\n"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_nbformat_4(name):
    nb = load(name)
    assert set(nb) == {"cells", "metadata", "nbformat", "nbformat_minor"}
    assert (nb["nbformat"], nb["nbformat_minor"]) == (4, 5)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids), "cell ids must be unique"
    for c in nb["cells"]:
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", c["id"]), c["id"]
        optional = {"attachments"} if c["cell_type"] == "markdown" else set()
        assert REQUIRED_KEYS[c["cell_type"]] <= set(c) <= REQUIRED_KEYS[c["cell_type"]] | optional
        assert isinstance(c["metadata"], dict)
        assert c["source"] and all(isinstance(line, str) for line in c["source"])
        if c["cell_type"] == "code":  # committed without outputs
            assert (c["outputs"], c["execution_count"]) == ([], None), c["id"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_its_badge_setup_planner_tensorboard_and_plot(name):
    extra, preset = NOTEBOOKS[name]
    nb = load(name)
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/{PLACEHOLDER}/blob/main/notebooks/"
             f"{name}.ipynb)")  # fmt: skip
    assert badge in sources(nb, "markdown")[0]
    code = "\n".join(sources(nb, "code"))
    assert f'REPO_URL = "https://github.com/{PLACEHOLDER}"' in code
    assert f"!pip install -q -c constraints.txt -e '.[{extra}]'" in code
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extra in extras["optional-dependencies"]
    assert f'"{preset}"' in code and (ROOT / preset).is_file()
    planner_device = re.search(r'^PLANNER_DEVICE = "([\w-]+)"', code, flags=re.M).group(1)
    assert planner_device in DEVICES
    for line in ("!python -m hanuman_jax.memory --config {CONFIG} --device {PLANNER_DEVICE}",
                 "%tensorboard --logdir {WORKDIR}",
                 "!python -m hanuman_jax.plot --workdir {WORKDIR}"):  # fmt: skip
        assert line in code, line
    page = (ROOT / "docs" / "colab.md").read_text()
    assert f"](../notebooks/{name}.ipynb)" in page and PLACEHOLDER in page


@pytest.mark.slow
def test_notebooks_run_on_cpu_with_the_smoke_switch(tmp_path):
    """The T4 notebook trains the tokenizer and a few steps; the TPU notebook, sharing the same
    workdir, reuses that tokenizer and resumes that run (what a rerun on Colab does)."""
    env = dict(os.environ, HANUMAN_SMOKE="1", HANUMAN_WORKDIR=str(tmp_path / "drive"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("XLA_FLAGS", None)
    out = {}
    for name in NOTEBOOKS:
        path = tmp_path / f"{name}.py"
        path.write_text(script(load(name)))
        done = subprocess.run([sys.executable, str(path)], cwd=ROOT / "notebooks", env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        out[name] = done.stdout + done.stderr
        assert done.returncode == 0, f"{name} failed:\n{out[name][-4000:]}"
    run = tmp_path / "drive/runs/smoke"
    assert (tmp_path / "drive/tokenizers/hanuman_sp1k.model").is_file()
    assert (run / "checkpoints/4").is_dir() and (run / "metrics.png").is_file()
    assert "wrote " in out["colab_t4"] and "fits" in out["colab_t4"]
    assert "reusing " in out["colab_tpu"] and "v2-8: fits" in out["colab_tpu"]
    assert "resumed from" in out["colab_tpu"] and "not in a notebook" in out["colab_tpu"]
