"""How a settings section is declared, read and checked: one mechanism for every section.

A section is a dataclass (:class:`Section`) whose fields are declared with :func:`setting`: the
default, the help text that ``--help`` prints, and any bounds, next to the field's type. The type
says what is allowed: ``int``, ``float``, ``bool``, ``str``, ``Optional[...]``, ``list[...]``, and
``Literal[...]`` for a fixed set of choices. A section checks itself whenever it is built: every
field against its type and bounds, then the section's own rules across its fields (its ``check``
method). Values read from YAML or ``section.key=value`` overrides are first turned into the
field's type (:func:`coerce`); values given in code must have it already. Errors name the setting
(``section.key``) and say what is expected.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, Literal, Optional

from ebft_megatron.errors import UserError


class ConfigError(UserError, ValueError):
    pass


_BOUNDS = ("minimum", "maximum", "above", "below")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, expect: Optional[str] = None,
            nonempty: bool = False, required: bool = False, **bounds):
    """A field of a settings section. ``bounds``: minimum / maximum (inclusive), above / below
    (exclusive); ``expect`` describes the value in errors when the type alone says too little;
    ``nonempty``: a string that may not be empty; ``required``: shown as such in ``--help`` (the
    section's ``check`` says so when it is missing)."""
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}")
    metadata = {"help": help, "expect": expect, "nonempty": nonempty, "required": required, **bounds}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional(annotation) -> tuple[Any, bool]:
    """(the type inside Optional, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def describe(annotation, metadata: dict, bounds: bool = True) -> str:
    """What a value of this field looks like, in words (with its bounds, unless ``bounds`` is off)."""
    inner, optional = _optional(annotation)
    if metadata.get("expect"):
        text = metadata["expect"]
    elif typing.get_origin(inner) is Literal:
        text = "one of " + ", ".join(str(a) for a in typing.get_args(inner))
    elif inner is bool:
        text = "true or false"
    elif inner in (int, float):
        noun = "an integer" if inner is int else "a number"
        low, high, above, below = (metadata.get(key) if bounds else None for key in _BOUNDS)
        if inner is int and low == 1 and high is None:
            text = "a positive integer"
        elif low is not None and (below is not None or high is not None):
            text = f"{noun} in [{low}, {below if below is not None else high}{')' if below is not None else ']'}"
        elif above is not None and (below is not None or high is not None):
            text = f"{noun} in ({above}, {below if below is not None else high}{')' if below is not None else ']'}"
        elif low is not None:
            text = f"{noun} >= {low}"
        elif above is not None:
            text = f"{noun} > {above}"
        else:
            text = noun
    elif typing.get_origin(inner) is list:
        text = "a list"
    elif inner is str:
        text = "a non-empty string" if metadata.get("nonempty") else "a string"
    else:
        text = getattr(inner, "__name__", str(inner))
    return f"{text} or null" if optional else text


def coerce(value: Any, annotation, where: str, error=ConfigError) -> Any:
    """A YAML value or an override string -> the field's type, or ``error`` naming ``where``."""
    inner, optional = _optional(annotation)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
        return None
    if inner is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        return value
    if inner is int and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        # inf and nan are floats without an integer value: left as they are, the type check names them
        return int(number) if math.isfinite(number) and number == int(number) else value
    if inner is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    if inner is str and value is None:
        return ""
    if inner is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typing.get_origin(inner) is list:
        if isinstance(value, str):
            import yaml

            try:
                value = yaml.safe_load(value) if value.strip() else []
            except (yaml.YAMLError, ValueError, RecursionError):
                raise error(f"{where}: {value!r} is not a YAML list; write it as [a, b]") from None
            if isinstance(value, (str, int, float)):
                value = [value]
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, list):
            item = typing.get_args(inner)[0] if typing.get_args(inner) else str
            return [coerce(v, item, f"{where}[{i}]", error) for i, v in enumerate(value)]
    return value


def _fits(value: Any, annotation) -> bool:
    inner, optional = _optional(annotation)
    if value is None:
        return optional
    if typing.get_origin(inner) is Literal:
        return value in typing.get_args(inner)
    if inner is bool:
        return isinstance(value, bool)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if inner is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner is str:
        return isinstance(value, str)
    if typing.get_origin(inner) is list:
        item = typing.get_args(inner)[0] if typing.get_args(inner) else Any
        return isinstance(value, list) and (item is Any or all(_fits(v, item) for v in value))
    return True


def _within(value, metadata: dict) -> bool:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    low, high, above, below = (metadata.get(key) for key in _BOUNDS)
    return ((low is None or value >= low) and (high is None or value <= high)
            and (above is None or value > above) and (below is None or value < below))


class Section:
    """A settings section: a dataclass of :func:`setting` fields that checks itself when built."""

    section: ClassVar[str] = ""
    error: ClassVar[type] = ConfigError

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            name = f"{self.section}.{f.name}"
            value = getattr(self, f.name)
            annotation = field_types(type(self))[f.name]
            meta = dict(f.metadata)
            if typing.get_origin(_optional(annotation)[0]) is Literal and value not in typing.get_args(
                    _optional(annotation)[0]) and not (value is None and _optional(annotation)[1]):
                raise self.error(f"{name}: {value!r} is not {describe(annotation, meta)}")
            if not _fits(value, annotation):
                raise self.error(f"{name}: expected {describe(annotation, meta, bounds=False)}, got {value!r}")
            if not _within(value, meta) or (meta.get("nonempty") and not value):
                raise self.error(f"{name}: expected {describe(annotation, meta)}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Rules across this section's fields (a subclass's); raise ``self.error`` naming the setting."""


def build(cls, values: dict, where: str):
    """A section from read values (YAML or overrides): turned into each field's type, then built and
    checked. Unknown keys and every error name the setting and ``where`` it came from."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section '{cls.section}' must be a mapping of settings, got {values!r}")
    types_ = field_types(cls)
    # YAML keys may be numbers or hold line breaks: sorted as text, shown quoted unless printable
    unknown = sorted(set(values) - set(types_), key=str)
    if unknown:
        shown = [f"{cls.section}.{k}" if isinstance(k, str) and k.isprintable() else f"{cls.section}.{k!r}"
                 for k in unknown]
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(shown)}; "
                          f"valid ones: {', '.join(f'{cls.section}.{k}' for k in types_)}")
    kwargs = {key: coerce(value, types_[key], f"{where}: {cls.section}.{key}", cls.error)
              for key, value in values.items()}
    try:
        return cls(**kwargs)
    except UserError as err:
        raise ConfigError(f"{where}: {err}") from None


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _declared_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def default_of(cls, name: str) -> Any:
    """A setting's declared default (None for one without), read without building the section (whose
    checks may load heavier modules)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return _declared_default(f)
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def unknown_and_missing(cls, keys) -> tuple[list, list]:
    """The keys of a stored object that dataclass ``cls`` does not declare (sorted), and the fields
    without a default that the keys lack: what a reader of a JSON description checks before
    ``cls(**data)``."""
    declared = dataclasses.fields(cls)
    unknown = sorted(set(keys) - {f.name for f in declared}, key=str)
    missing = [f.name for f in declared if f.name not in keys and not _has_default(f)]
    return unknown, missing


def help_lines(cls) -> list[str]:
    """``section.key = default`` and the help text of each field, for ``--help``."""
    lines = []
    for f in dataclasses.fields(cls):
        default = _declared_default(f)
        shown = "(required)" if f.metadata.get("required") else repr(default)
        lines.append(f"  {cls.section}.{f.name} = {shown}")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    return lines
