"""What an install gets: the packages and configs in the wheel, the console commands, the
dependencies our imports need, and commands that start without the optional extras."""

import ast
import importlib
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
# Declared though no module of ours imports it: sentencepiece_model_pb2 needs it, and sentencepiece
# leaves it to an extra.
IMPORTED_INDIRECTLY = {"protobuf"}


def _dist(requirement: str) -> str:
    """The normalized distribution name of a requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()


def _third_party_imports() -> set[str]:
    """Top-level modules that hanuman_jax imports (data.sources' `_optional` ones included)."""
    names = set()
    for path in (ROOT / "hanuman_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_optional":
                names.add(node.args[0].value.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "hanuman_jax"}


def test_imports_are_declared():
    project = PYPROJECT["project"]
    core = {_dist(r) for r in project["dependencies"]}
    extras = {_dist(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    provided = importlib.metadata.packages_distributions()
    used = set()
    for module in _third_party_imports():
        dists = {_dist(d) for d in provided.get(module, [])}
        assert dists & (core | extras), f"`import {module}` ({dists}): declare it in pyproject.toml"
        used |= dists
    unused = core - used - IMPORTED_INDIRECTLY
    assert not unused, f"core dependencies no module of ours imports: {unused}"
    assert "torch" not in core
    assert not {"torch", "transformers"} & _third_party_imports()  # only tests and scripts use them


def test_console_scripts_point_at_mains():
    expected = {"train", "generate", "evaluate", "export", "import", "plan", "plot", "data",
                "tokenizer"}  # fmt: skip
    assert set(SCRIPTS) == {f"hanuman-{name}" for name in expected}
    for entry in SCRIPTS.values():
        module, _, name = entry.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), entry


def test_packages_cover_the_source_tree():
    setuptools = PYPROJECT["tool"]["setuptools"]
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hanuman_jax").rglob("*.py")
    }
    assert set(setuptools["packages"]) == found | {"hanuman_jax.configs"}
    assert setuptools["package-dir"] == {"hanuman_jax.configs": "configs"}
    # load_config finds a stage's base config beside it: configs/ must stay one flat folder
    assert not list((ROOT / "configs").glob("*/*.py"))


def test_commands_start_without_the_optional_packages():
    """`--help` of every command with torch, transformers and the data extras unimportable."""
    blocked = ["torch", "transformers", "safetensors", "tokenizers", "datasets", "pyarrow",
               "tensorflow_datasets", "tensorboard"]  # fmt: skip
    code = (
        f"import importlib, sys\nsys.modules.update(dict.fromkeys({blocked!r}))\n"
        f"for entry in {sorted(SCRIPTS.values())!r}:\n"
        "    module, _, name = entry.partition(':')\n"
        "    try:\n"
        "        getattr(importlib.import_module(module), name)(['--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, entry\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("usage:") == len(SCRIPTS)


def test_export_without_safetensors_stops_before_writing(tmp_path):
    """Without safetensors (a dependency, so a --no-deps install), export and import stop with one
    line that gives the pip command; nothing is written. (Without torch they work:
    tests/test_export.py.)"""
    out = tmp_path / "out"
    for module, flag in [("hanuman_jax.export", "--workdir"), ("hanuman_jax.import_hf", "--model")]:
        code = (
            "import sys\nsys.modules['safetensors'] = None\n"
            f"from {module} import main\n"
            f"sys.exit(main([{flag!r}, {str(tmp_path)!r}, '--out', {str(out)!r}]))\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.splitlines()
        assert "need safetensors and tokenizers" in line, line
        assert line.endswith("pip install -c constraints.txt -e . (or pip install hanuman-jax)")
        assert not out.exists()


def test_the_wheel_ships_the_configs_and_the_sample(tmp_path):
    """A non-editable install has every configs/*.py as hanuman_jax/configs/ (for --config NAME)
    and the bundled sample corpus with its tokenizer."""
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("hanuman_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"hanuman_jax/configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
    assert configs and configs <= names, sorted(configs - names)
    sample = ROOT / "hanuman_jax" / "assets" / "sample"
    shipped = {str(p.relative_to(ROOT)) for p in sample.rglob("*") if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)
