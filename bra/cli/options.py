"""Click options generated from a frozen config dataclass, one per leaf field, and the config built back
from the parsed values: the options map 1:1 to the fields, so help texts and defaults cannot drift.

- help: the field's docstring, with ``[default: …]`` from the dataclass default;
- ``bool`` -> ``--x/--no-x``; ``Literal["a", "b"]`` -> ``click.Choice(["a", "b"])``; ``int | None`` -> int;
  ``tuple[str, ...]`` -> one comma-separated value (``--x a,b``);
- a nested config dataclass is flattened: its fields become ``--<field-name>`` flags of their own
  (a name that two fields would share is a TypeError at import).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any, Generic, Literal, TypeVar

import click

from bra.configs import MISSING, ConfigField, config_fields, from_flat

C = TypeVar("C")
F = TypeVar("F", bound=Callable[..., Any])

_SCALARS: dict[Any, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING}


class CommaList(click.ParamType):
    """``a,b`` -> ``("a", "b")``: a ``tuple[str, ...]`` field as one option value (items stripped; an
    empty value gives ``()`` and blank items stay, for the config to refuse)."""

    name = "comma-list"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        """Shown in --help after the flag."""
        return "A,B,..."

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, ...]:
        """The items of ``value`` (a tuple, e.g. a dataclass default, passes through)."""
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        return tuple(item.strip() for item in text.split(",")) if text else ()


COMMA_LIST = CommaList()


def _param_type(leaf: ConfigField, owner: str) -> click.ParamType | None:
    """The click type of a leaf (None for a bool, which becomes an on/off flag)."""
    if leaf.type is bool:
        return None
    if typing.get_origin(leaf.type) is Literal:
        choices = typing.get_args(leaf.type)
        if not all(isinstance(c, str) for c in choices):
            raise TypeError(f"{owner}.{leaf.name}: only Literal[str, ...] becomes a click.Choice")
        return click.Choice(list(choices))
    if leaf.type in _SCALARS:
        return _SCALARS[leaf.type]
    if typing.get_origin(leaf.type) is tuple and typing.get_args(leaf.type) == (str, ...):
        return COMMA_LIST
    raise TypeError(f"{owner}.{leaf.name}: no click option for type {leaf.type!r}")


class ConfigOptions(Generic[C]):
    """The options of config dataclass ``cls`` (use the instance as a decorator) and the config built
    back from what they parsed (``build``).

    ``defaults_none``: every option defaults to None (the help still shows the dataclass default), so
    ``build`` can tell a value given on the command line from one a preset (``base``) should fill.
    ``exclude``: leaf fields that get no option (they keep their defaults, or come from ``base``).
    ``rename``: leaf field -> flag name without dashes, for a field whose flag must differ.
    """

    def __init__(self, cls: type[C], *, defaults_none: bool = False, exclude: Collection[str] = (),
                 rename: Mapping[str, str] | None = None) -> None:
        self.cls = cls
        self.defaults_none = defaults_none
        leaves = config_fields(cls)
        names = {leaf.name for leaf in leaves}
        rename = dict(rename or {})
        for key in (*exclude, *rename):
            if key not in names:
                raise TypeError(f"{cls.__name__} has no field {key!r} to exclude or rename")
        self.leaves = tuple(leaf for leaf in leaves if leaf.name not in exclude)
        self.flags = {leaf.name: rename.get(leaf.name, leaf.name.replace("_", "-")) for leaf in self.leaves}
        self.params = {flag.replace("-", "_"): name for name, flag in self.flags.items()}
        if len(self.params) != len(self.flags):
            raise TypeError(f"{cls.__name__}: two fields share one flag ({sorted(self.flags.values())})")
        self._options = [self._option(leaf) for leaf in self.leaves]

    def _option(self, leaf: ConfigField) -> Callable[[F], F]:
        flag = self.flags[leaf.name]
        param = flag.replace("-", "_")
        kind = _param_type(leaf, self.cls.__name__)
        names = [f"--{flag}/--no-{flag}"] if kind is None else [f"--{flag}"]
        extra: dict[str, Any] = {} if kind is None else {"type": kind}
        text = leaf.doc
        if self.defaults_none:  # click would show None: name the value the config falls back to instead
            extra.update(default=None)
            if leaf.default is not MISSING:
                text = f"{text} [default: {leaf.default}]".strip()
        elif leaf.default is MISSING:
            extra.update(required=True)
        else:
            extra.update(default=leaf.default, show_default=True)
        return click.option(*names, param, help=text or None, **extra)

    def __call__(self, func: F) -> F:
        """Add the options to a click command function (in field order, below any added before)."""
        taken = {p.name for p in getattr(func, "__click_params__", [])}
        clash = sorted(taken & set(self.params))
        if clash:
            raise TypeError(f"{self.cls.__name__} options clash with the command's own: {', '.join(clash)}")
        for option in reversed(self._options):
            func = option(func)
        return func

    def build(self, params: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> C:
        """The config from parsed ``params`` (this helper's options; others are ignored) over ``base``
        (leaf field -> value, e.g. a preset) over the dataclass defaults. None means "not given". A value
        the config refuses (``__post_init__``'s ValueError) is a click.UsageError (one line, exit 2)."""
        given = {self.params[p]: v for p, v in params.items() if p in self.params and v is not None}
        try:
            return from_flat(self.cls, {**(base or {}), **given})
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None


__all__ = ["COMMA_LIST", "CommaList", "ConfigOptions"]
