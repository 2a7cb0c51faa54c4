"""Runs the README's user-facing commands, in order, as a new user would after the quick start.

Every shell command in the README's "Quick start", "What a run writes, and how to look at it" and
"Next steps" sections runs in a temporary directory that holds links to the repository's
`configs/`, `scripts/` and `hanuman_jax/` (so relative paths such as `runs/tiny` and
`hanuman_jax/assets/sample/...` mean what they mean at the repository root). Adjustments, and
only these:
- the venv, activate and `pip install` parts of a command are skipped: the test runs inside the
  environment the test command installed (the `test` extra includes `torch`); a skipped
  `pip install` must still name a constraints file and extras that exist;
- `python` is this interpreter;
- training commands get `--config.train.steps=6 --config.train.batch_size=4
  --config.train.log_every=2 --no-progress` appended, so that the chain of runs takes seconds;
- `tensorboard --logdir DIR` is started on 127.0.0.1 at a free port, asked for its runs within a
  bounded wait and stopped; where the `tensorboard` extra is not installed, only the event files
  it would show are checked.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("Quick start", "What a run writes, and how to look at it", "Next steps")
TRAIN_OVERRIDES = [
    "--config.train.steps=6",
    "--config.train.batch_size=4",
    "--config.train.log_every=2",
    "--no-progress",
]
SETUP_WORDS = ("python3", ".", "pip")  # python3 -m venv, . .venv/bin/activate, pip install
COMMAND_TIMEOUT_S = 300


def readme_sections() -> dict[str, str]:
    """Each `## ` section's body by its title."""
    parts = re.split(r"^## (.+)$", (ROOT / "README.md").read_text(), flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def shell_commands(body: str) -> list[list[str]]:
    """The commands of a section's ```bash blocks as argv lists, `&&` chains split, comments
    dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1 :]
    return [c for c in commands if c]


def readme_commands() -> list[list[str]]:
    """The commands of the tested sections, in README order; each section must hold some."""
    sections = readme_sections()
    commands = []
    for title in SECTIONS:
        assert title in sections, f"README.md has no '## {title}' section (tested by this file)"
        found = shell_commands(sections[title])
        assert found, f"README.md's '## {title}' section has no ```bash command"
        commands += found
    return commands


def is_setup(argv: list[str]) -> bool:
    """A venv, activate or pip step: already done by the environment running the tests."""
    return argv[0] in SETUP_WORDS and (argv[0] != "python3" or argv[1:3] == ["-m", "venv"])


def check_setup(argv: list[str]) -> None:
    """A skipped `pip install` names constraint files and extras that exist."""
    if argv[0] != "pip":
        return
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-c":
            assert (ROOT / value).is_file(), f"README: pip -c {value}: no such file"
        if flag == "-e" and value != ".":
            named = re.fullmatch(r"\.\[([\w,-]+)\]", value)
            assert named, f"README: pip -e {value}: expected .[extra,...]"
            missing = set(named.group(1).split(",")) - set(extras)
            assert not missing, f"README: pip install of extras pyproject.toml lacks: {missing}"


def run(argv: list[str], cwd: Path, env: dict) -> str:
    """Runs one README command; fails with its output's tail when it fails."""
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    if argv[1:3] == ["-m", "hanuman_jax.train"] and "--dry-run" not in argv:
        argv = [*argv, *TRAIN_OVERRIDES]
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"README command failed ({done.returncode}): {argv}\n{out[-3000:]}"
    return done.stdout


def check_tensorboard(argv: list[str], cwd: Path, env: dict) -> None:
    """`tensorboard --logdir DIR` serves DIR's runs (started on 127.0.0.1, then stopped)."""
    assert argv[1] == "--logdir", argv
    logdir = cwd / argv[2]
    assert list(logdir.glob("tensorboard/events.out.tfevents.*")), f"no event files in {logdir}"
    exe = shutil.which("tensorboard", path=env["PATH"])
    if exe is None:  # the `tensorboard` extra is not part of the `test` extra
        return
    server = subprocess.Popen(
        [exe, *argv[1:], "--host", "127.0.0.1", "--port", "0"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        url = None
        while url is None and time.monotonic() < deadline and server.poll() is None:
            found = re.search(r"(http://127\.0\.0\.1:\d+/)", server.stderr.readline())
            url = found and found.group(1)
        assert url, "tensorboard printed no address within 90 s"
        with urllib.request.urlopen(url + "data/runs", timeout=30) as response:
            assert "tensorboard" in json.load(response)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def check_outputs(cwd: Path, outputs: dict[str, str]) -> None:
    """What the commands promise to leave behind."""
    assert (cwd / "runs/tiny/metrics.png").is_file()
    assert (cwd / "exports/tiny/config.json").is_file()
    assert json.loads(outputs["hanuman_jax.evaluate"].strip().splitlines()[-1])["loss"] > 0
    for workdir in ("runs/tiny", "runs/tiny_stage_b", "runs/tiny_stage_c"):
        assert (cwd / workdir / "checkpoints" / "6").is_dir(), workdir
        rows = (cwd / workdir / "metrics.jsonl").read_text().splitlines()
        assert any("eval_bits_per_byte" in json.loads(r) for r in rows), f"{workdir}: no eval row"
    assert (cwd / "runs/tiny_stage_c/samples.jsonl").read_text().strip(), "no chat samples"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    commands = readme_commands()
    assert sum(c[1:3] == ["-m", "hanuman_jax.train"] for c in commands) >= 3
    for name in ("configs", "scripts", "hanuman_jax"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    outputs = {}
    for argv in commands:
        if is_setup(argv):
            check_setup(argv)
            continue
        if argv[0] == "tensorboard":
            check_tensorboard(argv, tmp_path, env)
            continue
        outputs[argv[2] if argv[1] == "-m" else argv[1]] = run(argv, tmp_path, env)
    check_outputs(tmp_path, outputs)
