"""Tokenizer quality: compression, unknowns, byte fallback, round trip, per script."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from hanuman_jax.tokenizer.core import Tokenizer

_THAI = re.compile(r"[\u0E00-\u0E7F]")
_LATIN = re.compile(r"[A-Za-z\u00C0-\u024F]")


def script_of(line: str) -> str:
    """thai, latin, mixed (both) or other."""
    thai, latin = bool(_THAI.search(line)), bool(_LATIN.search(line))
    return "mixed" if thai and latin else "thai" if thai else "latin" if latin else "other"


@dataclass
class Counts:
    """Sums over lines: of the normalized text, of its tokens, and the first lines that fail."""

    lines: int = 0
    chars: int = 0
    bytes: int = 0
    failures: list[str] = field(default_factory=list)  # at most 3, as they are summed in
    tokens: int = 0
    unk: int = 0
    byte_fallback: int = 0
    roundtrip: int = 0

    def add(self, other: Counts) -> None:
        for f in fields(self):
            if f.name != "failures":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self) -> dict[str, float | int]:
        tokens = max(self.tokens, 1)
        return {
            "lines": self.lines,
            "tokens": self.tokens,
            "chars_per_token": self.chars / tokens,
            "bytes_per_token": self.bytes / tokens,
            "unk_rate": self.unk / tokens,
            "byte_fallback_rate": self.byte_fallback / tokens,
            "roundtrip_rate": self.roundtrip / max(self.lines, 1),
        }


def measure(tokenizer: Tokenizer, lines: Iterable[str]) -> dict[str, Counts]:
    """Counts over all lines and per script; chars and bytes are those of the normalized text."""
    sp = tokenizer.sp
    byte_ids = {i for i in range(tokenizer.vocab_size) if sp.is_byte(i)}
    per = {script: Counts() for script in ("thai", "latin", "mixed", "other")}
    for line in lines:
        ids = tokenizer.encode(line)
        norm = tokenizer.normalize(line)
        c = Counts(lines=1, chars=len(norm), bytes=len(norm.encode("utf-8")), tokens=len(ids))
        c.unk = sum(i == tokenizer.unk_id for i in ids)
        c.byte_fallback = sum(i in byte_ids for i in ids)
        c.roundtrip = int(tokenizer.decode(ids) == norm)
        bucket = per[script_of(line)]
        bucket.add(c)
        if not c.roundtrip and len(bucket.failures) < 3:
            bucket.failures.append(line[:80])
    total = Counts()
    for c in per.values():
        total.add(c)
    return {"all": total, **per}


def tokens_per_word(tokenizer: Tokenizer, segmented_lines: Iterable[str]) -> float:
    """Tokens per human-segmented word (`|` between words; whitespace entries are not words)."""
    tokens = words = 0
    for line in segmented_lines:
        parts = line.rstrip("\n").split("|")
        tokens += len(tokenizer.encode("".join(parts)))
        words += sum(1 for p in parts if p.strip())
    return tokens / max(words, 1)


def summarize(results: dict[str, Counts]) -> dict[str, float | int]:
    """Overall figures plus lines and chars/token per script, for the JSON line."""
    summary = results["all"].summary()
    for name, counts in results.items():
        if name != "all":
            s = counts.summary()
            summary |= {
                f"{name}_lines": s["lines"],
                f"{name}_chars_per_token": s["chars_per_token"],
            }
    return summary


def format_table(results: dict[str, Counts]) -> str:
    header = (
        f"{'lines':>8} {'chars/tok':>9} {'bytes/tok':>9} {'unk':>8} {'bytefb':>8} {'roundtrip':>9}"
    )
    rows = [f"{'':8} {header}"]
    for name, c in results.items():
        s = c.summary()
        rows.append(
            f"{name:8} {s['lines']:8d} {s['chars_per_token']:9.3f} {s['bytes_per_token']:9.3f} "
            f"{s['unk_rate']:8.2%} {s['byte_fallback_rate']:8.2%} {s['roundtrip_rate']:9.2%}"
        )
        rows += [f"{'':8}   round trip fails: {line!r}" for line in c.failures]
    return "\n".join(rows)
