import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(python3 -m venv .*)\n```", readme)


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    train, test = _commands()[:2]
    assert "python -m hanuman_jax.train --config configs/tiny.py" in train
    assert "pip install torch==2.13.0" in test and test.endswith("python -m pytest -q -n 2")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci
