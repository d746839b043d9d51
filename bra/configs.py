"""Reading the frozen config dataclasses of every stage: field docstrings, real field types, and nested
configs flattened to their leaf fields (and built back from them).

Pure reflection over ``dataclasses`` and ``typing``: this module imports nothing from ``bra``, so any layer
(the store, the SAE, the audit, the CLI) can describe its configs with it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

MISSING: Any = dataclasses.MISSING
"""The default of a field that has none (``dataclasses.MISSING``)."""


@dataclass(frozen=True)
class ConfigField:
    """One leaf field of a (possibly nested) config dataclass."""

    path: tuple[str, ...]
    """Attribute path from the outer config, e.g. ``("reader", "buffer_rows")``."""
    type: Any
    """The field's type with ``Optional``/``| None`` removed (``int``, ``Literal["a", "b"]``, ...)."""
    optional: bool
    """Whether None is allowed too."""
    default: Any
    """The default the outer config gives this field; ``MISSING`` when it has none."""
    doc: str
    """The docstring under the field ("" when it has none)."""

    @property
    def name(self) -> str:
        """The leaf name (unique within one config)."""
        return self.path[-1]


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of a dataclass (the string literal under each field), for --help texts."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                and isinstance(nxt.value.value, str):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def is_config(tp: Any) -> bool:
    """Whether ``tp`` is a dataclass type (a nested config, flattened into its leaves)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def strip_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` / ``Optional[int]`` -> ``(int, True)``; anything else -> ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)) and len(args) == 1:
            return args[0], True
    return tp, False


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@functools.cache
def config_fields(cls: type) -> tuple[ConfigField, ...]:
    """The leaf fields of config dataclass ``cls`` in declaration order, nested configs expanded in place.

    Leaf names must be unique across the nesting (they become one flat namespace: CLI flags, presets);
    a clash raises TypeError, so a config that could not be flattened fails at import. Cached per class
    (configs are frozen; their defaults are read once).
    """
    leaves = _leaves(cls, (), MISSING)
    seen: dict[str, tuple[str, ...]] = {}
    for leaf in leaves:
        if leaf.name in seen:
            raise TypeError(f"{cls.__name__}: field name {leaf.name!r} appears twice "
                            f"({'.'.join(seen[leaf.name])} and {'.'.join(leaf.path)})")
        seen[leaf.name] = leaf.path
    return leaves


def _leaves(cls: type, prefix: tuple[str, ...], instance: Any) -> tuple[ConfigField, ...]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: list[ConfigField] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = _field_default(f) if instance is MISSING else getattr(instance, f.name)
        tp, optional = strip_optional(hints[f.name])
        if is_config(tp) and not optional:
            out += _leaves(tp, (*prefix, f.name), default)
        else:
            out.append(ConfigField((*prefix, f.name), tp, optional, default, docs.get(f.name, "")))
    return tuple(out)


def flat_values(config: Any) -> dict[str, Any]:
    """Leaf name -> value of a config instance (the inverse of ``from_flat``)."""
    out: dict[str, Any] = {}
    for leaf in config_fields(type(config)):
        value = config
        for part in leaf.path:
            value = getattr(value, part)
        out[leaf.name] = value
    return out


def from_flat(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build config ``cls`` from leaf name -> value; leaves not given keep their defaults (a nested config
    given in part keeps its default's other values). ``__post_init__`` validation runs as usual (ValueError).
    """
    names = {leaf.name for leaf in config_fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    return _build(cls, values)


def _build(cls: type[T], values: Mapping[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = strip_optional(hints[f.name])
        if is_config(tp) and not optional:
            inner = {leaf.name for leaf in config_fields(tp)}
            given = {k: v for k, v in values.items() if k in inner}
            default = _field_default(f)
            if given or default is MISSING:
                base = {} if default is MISSING else flat_values(default)
                kwargs[f.name] = _build(tp, {**base, **given})
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


__all__ = ["MISSING", "ConfigField", "config_fields", "field_docs", "flat_values", "from_flat", "is_config",
           "strip_optional"]
