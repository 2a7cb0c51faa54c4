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


def test_readme_and_docs_links_point_at_files_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5, "docs/ holds the internals the README links to"
    linked = set()
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            path = (page.parent / target).resolve()
            assert path.exists(), (
                f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            )
            linked.add(path)
    unlinked = [p.name for p in pages[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages no page links to: {unlinked}"


def test_readme_and_docs_name_files_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = r"`((?:hanuman_jax|scripts|configs|tests)/[\w/.]+\.(?:py|md))`"
    for page in pages:
        for path in re.findall(named, page.read_text()):
            assert (ROOT / path).exists(), f"{page.relative_to(ROOT)} names a missing {path}"
