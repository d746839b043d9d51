"""Evaluation prompt sets in the upstream JSONL format.

One JSON object a line with the fields ``id, tier, framing, prompt, rationale, expected_surface,
category`` and the optional ``sampled_from`` and ``domain``. Blank lines are skipped. Fields this schema
does not know (upstream's ``dataset_version``, ``generation_model``, ``needs_review``...) are kept as the
prompt's ``metadata``, with one warning per file naming them, and become extra columns of an eval store's
prompts table. Every problem is reported as one line, ``PATH:LINENO: message``, so editors and CI logs can
jump straight to it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bra.errors import BraError
from bra.vocab import EVAL_TIERS, EXPECTED_SURFACES, FRAMINGS, SURFACE_CLASSES, TIERS

logger = logging.getLogger(__name__)

__all__ = [
    "EVAL_TIERS", "EXPECTED_SURFACES", "FRAMINGS", "SURFACE_CLASSES", "TIERS", "EvalPrompt", "PromptSetError",
    "load_eval_set", "load_eval_set_files", "load_eval_sets", "metadata_columns",
]


_MAX_SHOWN_VALUE = 60
_OPTIONAL_FIELDS: frozenset[str] = frozenset({"sampled_from", "domain"})
_METADATA_PREFIX = "meta_"


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


def _check_unicode(name: str, value: Any) -> None:
    """Refuse text that has no UTF-8 form: a lone surrogate such as JSON's ``"\\ud800"``, which tokenizers
    and parquet reject far from the line it came from."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"field {name!r} holds invalid Unicode (lone surrogate {text[exc.start]!r} at "
                         f"character {exc.start + 1})") from None


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt with its labels."""

    id: str
    """Unique identifier, e.g. ``"ben-01"``."""
    tier: str
    """One of ``EVAL_TIERS``."""
    framing: str
    """One of ``FRAMINGS``."""
    prompt: str
    """The user message sent to the model."""
    rationale: str
    """Why the prompt is in the set and why it has its expected surface."""
    expected_surface: str
    """The surface behaviour a well-calibrated model shows; one of ``EXPECTED_SURFACES`` (a surface class, or
    ``comply_or_hedge`` / ``refuse_or_hedge``)."""
    category: str
    """Short snake_case topic or harm category."""
    sampled_from: str | None = None
    """Source the prompt was sampled or adapted from, if any."""
    domain: str | None = None
    """Scientific domain, e.g. ``"virology"``, if apt."""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)
    """The record's other fields (``dataset_version``, ``generation_model``...), as read; never validated
    beyond being valid Unicode."""

    def __post_init__(self) -> None:
        for name in _ALL_FIELDS:
            value = getattr(self, name)
            optional = name in _OPTIONAL_FIELDS
            if optional and value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                kind = "a non-empty string or null" if optional else "a non-empty string"
                raise ValueError(f"field {name!r} must be {kind}, got {_shown(value)}")
            _check_unicode(name, value)
        for key, value in self.metadata.items():
            _check_unicode(key, key)
            _check_unicode(key, value)
        _check_choice("tier", self.tier, EVAL_TIERS)
        _check_choice("framing", self.framing, FRAMINGS)
        if self.expected_surface not in EXPECTED_SURFACES:
            choices = ", ".join(EXPECTED_SURFACES)
            got = _shown(self.expected_surface)
            raise ValueError(f"expected_surface must be one of {choices}, got {got}")


_ALL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EvalPrompt) if f.name != "metadata")
"""The record fields of the upstream format (``EvalPrompt``'s fields but ``metadata``)."""
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
    known = {k: v for k, v in obj.items() if k in _ALL_FIELDS}
    return EvalPrompt(**known, metadata={k: v for k, v in obj.items() if k not in _ALL_FIELDS})


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
    unknown = sorted({k for record, _ in records for k in record.metadata})
    if unknown:
        logger.warning("%s: %s kept as metadata (extra columns of the prompts table)", path,
                       _names("unknown field", unknown))
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


def load_eval_set_files(paths: Iterable[str | Path]) -> list[list[EvalPrompt]]:
    """Load several prompt sets, one list per file in order; ids must be unique across all sets.

    Raises:
        PromptSetError: on a malformed line, an id repeated across sets, or no paths at all.
    """
    sets: list[list[EvalPrompt]] = []
    first_seen: dict[str, tuple[Path, int]] = {}
    for path in map(Path, paths):
        records: list[EvalPrompt] = []
        for record, lineno in _load_with_lines(path):
            if record.id in first_seen:
                seen_path, seen_line = first_seen[record.id]
                raise PromptSetError(
                    f"{path}:{lineno}: duplicate id {_shown(record.id)} "
                    f"(first seen at {seen_path}:{seen_line})"
                )
            first_seen[record.id] = (path, lineno)
            records.append(record)
        sets.append(records)
    if not first_seen:
        raise PromptSetError("no prompt set paths given")
    return sets


def load_eval_sets(paths: Iterable[str | Path]) -> list[EvalPrompt]:
    """Load several prompt sets into one list, in order; ids must be unique across all sets.

    Raises:
        PromptSetError: on a malformed line, an id repeated across sets, or no paths at all.
    """
    return [record for records in load_eval_set_files(paths) for record in records]


def metadata_columns(prompts: Sequence[EvalPrompt], taken: Iterable[str] = ()) -> dict[str, list[Any]]:
    """The prompts' metadata as table columns: one per key (in order of first appearance), None where a
    prompt lacks the key.

    A column whose values are not all of one scalar type (str, bool, int or float) holds them as JSON text,
    so any mix of records writes to parquet. A key already among ``taken`` (the table's own columns) is
    prefixed ``meta_``.
    """
    keys: dict[str, None] = {}
    for p in prompts:
        keys.update(dict.fromkeys(p.metadata))
    used = set(taken)
    columns: dict[str, list[Any]] = {}
    for key in keys:
        values = [p.metadata.get(key) for p in prompts]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 or not kinds <= {str, bool, int, float}:
            values = [None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True)
                      for v in values]
        name = key
        while name in used:
            name = _METADATA_PREFIX + name
        used.add(name)
        columns[name] = values
    return columns
