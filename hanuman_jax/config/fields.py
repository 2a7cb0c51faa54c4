"""The config error, and the small rules that each section's table of fields is checked with."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, Self

import ml_collections


class ConfigError(ValueError):
    """A user mistake in a config or an override; the message is one actionable line."""


def check(ok: bool, key: str, value: Any, valid: str) -> None:
    """Raises `config key=value is invalid: valid` unless `ok`."""
    if not ok:
        raise ConfigError(f"config {key}={value!r} is invalid: {valid}")


class Rule(Protocol):
    def problem(self, value: Any) -> str | None:
        """What would be valid, when `value` is not; None when it is."""


def _note(text: str, note: str) -> str:
    return f"{text} ({note})" if note else text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


# step counters, token ids and positions are int32 on the device
INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer >= `lo` (any integer when `lo` is None), and <= `hi` where one is given."""

    lo: int | None = 1
    note: str = ""
    hi: int | None = None

    def problem(self, value: Any) -> str | None:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        lo, hi = self.lo, self.hi
        if is_int and (lo is None or value >= lo) and (hi is None or value <= hi):
            return None
        ends = [f">= {lo}"] * (lo is not None) + [f"<= {hi}"] * (hi is not None)
        return _note(f"must be an integer {' and '.join(ends)}".rstrip(), self.note)


@dataclasses.dataclass(frozen=True)
class Number:
    """A finite number between `lo` and `hi`, each end open or closed."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if not math.isfinite(value):
            return "must be a finite number"
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return None if above and below else _note(self.valid(), self.note)

    def valid(self) -> str:
        if math.isinf(self.hi):
            return f"must be {'>' if self.lo_open else '>='} {_num(self.lo)}"
        ends = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"must be in {ends[0]}{_num(self.lo)}, {_num(self.hi)}{ends[1]}"


def above(lo: float, note: str = "") -> Number:
    return Number(lo, lo_open=True, note=note)


def at_least(lo: float, note: str = "") -> Number:
    return Number(lo, note=note)


def within(lo: float, hi: float, *, hi_open: bool = False, note: str = "") -> Number:
    return Number(lo, hi, hi_open=hi_open, note=note)


FINITE = Number()


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of a few strings."""

    choices: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        return None if value in self.choices else f"one of {', '.join(self.choices)}"


@dataclasses.dataclass(frozen=True)
class Text:
    """A string, empty only where `empty_ok` (and `valid` says what empty means)."""

    valid: str
    empty_ok: bool = False

    def problem(self, value: Any) -> str | None:
        ok = isinstance(value, str) and (self.empty_ok or value != "")
        return None if ok else self.valid


@dataclasses.dataclass(frozen=True)
class Flag:
    """True or False."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "must be true or false"


FLAG = Flag()


class Section:
    """A frozen config section: `RULES` check single fields, then `check_fields` the rest.

    Subclasses are frozen dataclasses whose fields are the section's keys; `PREFIX` is the
    section's dotted name in the config (`model.moe`), used in every message.
    """

    PREFIX: ClassVar[str]
    RULES: ClassVar[Mapping[str, Rule]] = {}

    def __post_init__(self) -> None:
        for name, rule in self.RULES.items():
            value = getattr(self, name)
            problem = rule.problem(value)
            check(problem is None, f"{self.PREFIX}.{name}", value, problem or "")
        self.check_fields()

    def check_fields(self) -> None:
        """Rules over several fields, or more than a table entry says (none by default)."""

    @classmethod
    def from_config(cls, node: ml_collections.ConfigDict | Mapping[str, Any]) -> Self:
        """The section built (and so checked) from its ConfigDict (or dict) of keys."""
        return cls(**section_keys(cls, node))


def section_keys(cls: type, node: Any) -> dict[str, Any]:
    """`node`'s keys as a dict; refused when one is not a field of `cls`, or one is missing."""
    if isinstance(node, ml_collections.ConfigDict):
        raw = node.to_dict()
    elif isinstance(node, Mapping):
        raw = dict(node)
    else:
        raise ConfigError(f"config {cls.PREFIX}={node!r} is invalid: must be a section of keys")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in raw:
        if key not in names:
            raise ConfigError(
                f"config {cls.PREFIX}.{key} is not a known key; valid keys: {', '.join(names)}"
            )
    for f in fields:
        needed = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if needed and f.name not in raw:
            raise ConfigError(f"config {cls.PREFIX}.{f.name} is missing; set it in the config file")
    return raw
