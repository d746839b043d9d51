"""Evaluation prompt sets in the upstream JSONL format.

One JSON object a line with the fields ``id, tier, framing, prompt, rationale, expected_surface,
category`` and the optional ``sampled_from`` and ``domain``. Blank lines are skipped. Every problem is
reported as one line, ``PATH:LINENO: message``, so editors and CI logs can jump straight to it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bra.errors import BraError
from bra.vocab import FRAMINGS, SURFACE_CLASSES, TIERS

logger = logging.getLogger(__name__)


_MAX_SHOWN_VALUE = 60
_OPTIONAL_FIELDS: frozenset[str] = frozenset({"sampled_from", "domain"})


class PromptSetError(BraError, ValueError):
    """A prompt set file is malformed; the message is one line, ``PATH:LINENO: message``.

    A ``BraError`` so the CLIs print it as a user error; a ``ValueError`` because it is bad input.
    """


def _shown(value: object) -> str:
    # repr() escapes newlines, which keeps every error message on one line.
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_VALUE else text[: _MAX_SHOWN_VALUE - 3] + "..."


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {_shown(value)} (expected one of {', '.join(choices)})")


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt with its labels."""

    id: str
    """Unique identifier, e.g. ``"ben-01"``."""
    tier: str
    """One of ``TIERS``."""
    framing: str
    """One of ``FRAMINGS``."""
    prompt: str
    """The user message sent to the model."""
    rationale: str
    """Why the prompt is in the set and why it has its expected surface."""
    expected_surface: str
    """The surface behaviour a well-calibrated model shows; one of ``SURFACE_CLASSES``."""
    category: str
    """Short snake_case topic or harm category."""
    sampled_from: str | None = None
    """Source the prompt was sampled or adapted from, if any."""
    domain: str | None = None
    """Scientific domain, e.g. ``"virology"``, if apt."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            optional = f.name in _OPTIONAL_FIELDS
            if optional and value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                kind = "a non-empty string or null" if optional else "a non-empty string"
                raise ValueError(f"field {f.name!r} must be {kind}, got {_shown(value)}")
        _check_choice("tier", self.tier, TIERS)
        _check_choice("framing", self.framing, FRAMINGS)
        if self.expected_surface not in SURFACE_CLASSES:
            choices = ", ".join(SURFACE_CLASSES)
            got = _shown(self.expected_surface)
            raise ValueError(f"expected_surface must be one of {choices}, got {got}")


_ALL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EvalPrompt))
_REQUIRED_FIELDS: tuple[str, ...] = tuple(n for n in _ALL_FIELDS if n not in _OPTIONAL_FIELDS)


def _names(kind: str, names: list[str]) -> str:
    plural = "s" if len(names) > 1 else ""
    return f"{kind}{plural} " + ", ".join(repr(n) for n in names)


def _parse_record(line: str) -> EvalPrompt:
    """Parse one non-blank line; raises ``ValueError`` with a location-free, one-line message."""
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"record must be a JSON object, got {type(obj).__name__}")
    missing = [n for n in _REQUIRED_FIELDS if n not in obj]
    if missing:
        raise ValueError(_names("missing field", missing))
    unknown = sorted(k for k in obj if k not in _ALL_FIELDS)
    if unknown:
        raise ValueError(_names("unknown field", unknown))
    return EvalPrompt(**obj)


def _load_with_lines(path: Path) -> list[tuple[EvalPrompt, int]]:
    records: list[tuple[EvalPrompt, int]] = []
    first_seen: dict[str, int] = {}
    raw_lines = path.read_bytes().splitlines()
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            # utf-8-sig on the first line tolerates a byte-order mark from Windows editors.
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise PromptSetError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start + 1})") from exc
        if not line.strip():
            continue
        try:
            record = _parse_record(line)
        except ValueError as exc:
            raise PromptSetError(f"{path}:{lineno}: {exc}") from exc
        if record.id in first_seen:
            seen = first_seen[record.id]
            raise PromptSetError(
                f"{path}:{lineno}: duplicate id {_shown(record.id)} (first seen at line {seen})"
            )
        first_seen[record.id] = lineno
        records.append((record, lineno))
    if not records:
        # An empty set would silently yield empty metrics downstream.
        raise PromptSetError(f"{path}:1: empty prompt set (no records)")
    return records


def load_eval_set(path: str | Path) -> list[EvalPrompt]:
    """Load and validate one JSONL prompt set.

    Raises:
        PromptSetError: on the first malformed line, as ``PATH:LINENO: message``.
        OSError: if the file cannot be read.
    """
    records = [record for record, _ in _load_with_lines(Path(path))]
    logger.debug("loaded %d prompts from %s", len(records), path)
    return records


def load_eval_sets(paths: Iterable[str | Path]) -> list[EvalPrompt]:
    """Load several prompt sets into one list, in order; ids must be unique across all sets.

    Raises:
        PromptSetError: on a malformed line, an id repeated across sets, or no paths at all.
    """
    records: list[EvalPrompt] = []
    first_seen: dict[str, tuple[Path, int]] = {}
    for path in map(Path, paths):
        for record, lineno in _load_with_lines(path):
            if record.id in first_seen:
                seen_path, seen_line = first_seen[record.id]
                raise PromptSetError(
                    f"{path}:{lineno}: duplicate id {_shown(record.id)} "
                    f"(first seen at {seen_path}:{seen_line})"
                )
            first_seen[record.id] = (path, lineno)
            records.append(record)
    if not first_seen:
        raise PromptSetError("no prompt set paths given")
    return records
