"""The base of every typed option in LGTM-DS: the experiment's sections (``lgtm_ds.config``)
and each component's own options (a method's hyper-parameters, beside the method).

An :class:`Options` model is frozen, refuses unknown keys and reads command-line strings and
YAML scalars leniently (:func:`lenient`). Each field's default is THE default, its
``description`` documents it, its constraints (``ge``/``gt``/``le``/``lt``, ``Literal``) validate
it. A ``pydantic.ValidationError`` never reaches the user: :func:`config_error` turns it into one
``ConfigError`` naming the dotted key, the value and the rule, the rule worded from the field's
own constraints (:func:`rule`). A ``ConfigError`` raised inside a validator (a registry, a
cross-field check) passes through unchanged.

This module imports pydantic only (YAML lazily), so the methods may define their options with it.
"""

from __future__ import annotations

import difflib
import importlib
import types
import typing
from collections.abc import Callable
from contextlib import suppress
from typing import Annotated, Any, ClassVar, Literal

import annotated_types as at
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from .errors import ConfigError

# --------------------------------------------------------------------------------------------
# Lenient input: command-line strings and YAML scalars -> the field's type
# --------------------------------------------------------------------------------------------

NONE_STRINGS = ("null", "none", "~", "")


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]


def _strip(annotation: Any) -> tuple[Any, bool]:
    """``(annotation without None and Annotated, whether None is allowed)``."""
    nullable = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        nullable = type(None) in typing.get_args(annotation)
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation, nullable


def base_type(annotation: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``, ``list[str]`` -> ``(list, False)``; a Literal stays."""
    annotation, nullable = _strip(annotation)
    origin = typing.get_origin(annotation)
    return (annotation if origin in (None, Literal) else origin), nullable


def type_name(annotation: Any) -> str:
    """``float | null``, ``list[str]``, ``dict``: the type as a user reads it."""
    if annotation is type(None):
        return "null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Annotated:
        return type_name(args[0])
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _cannot_convert() -> PydanticCustomError:
    return PydanticCustomError("cannot_convert", "cannot convert the value")


def _yaml_value(text: str) -> Any:
    import yaml  # lazy: the methods' options import this module, the algorithm no YAML

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise _cannot_convert() from None
    return {} if value is None else value  # "" / "null" for a dict field: empty


def lenient(value: Any, annotation: Any) -> Any:
    """What pydantic's lax mode does not do for us: "none"/"null"/"~"/"" -> None for an optional
    field, "1e3" -> 1000 for an int, a comma string -> list, a YAML flow string -> dict/list; a
    bool is refused for an int or float (pydantic would read True as 1)."""
    tp, nullable = base_type(annotation)
    if isinstance(value, str):
        s = value.strip()
        if nullable and s.lower() in NONE_STRINGS:
            return None
        if tp is float:
            with suppress(ValueError):
                return float(s)
        elif tp is int:
            with suppress(ValueError):
                return int(s)
            with suppress(ValueError):
                number = float(s)  # "1e3"
                if number.is_integer():
                    return int(number)
        elif tp is bool:
            return s
        elif tp is list and not s.startswith("["):
            return [p.strip() for p in s.split(",") if p.strip()]
        elif tp in (list, dict):
            parsed = _yaml_value(s)
            if not isinstance(parsed, tp):
                raise _cannot_convert()
            return parsed
    elif isinstance(value, bool) and tp in (int, float):
        raise _cannot_convert()
    return value


# --------------------------------------------------------------------------------------------
# ValidationError -> one ConfigError
# --------------------------------------------------------------------------------------------

_BOUNDS = (at.Gt, at.Ge, at.Lt, at.Le)


def rule(field: FieldInfo) -> str | None:
    """The field's constraint as a user reads it: ``in (0, 0.5]``, ``null or > 0``,
    ``one of {fp32, bf16, fp16}``; None if it has none."""
    tp, nullable = base_type(field.annotation)
    if typing.get_origin(tp) is Literal:
        text = f"one of {{{', '.join(map(str, typing.get_args(tp)))}}}"
    elif isinstance(field.json_schema_extra, dict) and "choices" in field.json_schema_extra:
        module, name = str(field.json_schema_extra["choices"]).split(":")
        names = getattr(importlib.import_module(module), name)()
        text = f"one of {{{', '.join(names)}}}"
    else:
        bounds = [m for m in field.metadata if isinstance(m, _BOUNDS)]
        b = {type(m): getattr(m, type(m).__name__.lower()) for m in bounds}
        lo = b.get(at.Gt, b.get(at.Ge))
        hi = b.get(at.Lt, b.get(at.Le))
        if lo is not None and hi is not None:
            text = f"in {'(' if at.Gt in b else '['}{lo:g}, {hi:g}{')' if at.Lt in b else ']'}"
        elif lo is not None:
            text = f"{'>' if at.Gt in b else '>='} {lo:g}"
        elif hi is not None:
            text = f"{'<' if at.Lt in b else '<='} {hi:g}"
        else:
            return None
    return f"null or {text}" if nullable else text


def unknown_key(dotted: str, valid: list[str]) -> ConfigError:
    name = dotted.rsplit(".", 1)[-1]
    owner = dotted.rsplit(".", 1)[0] if "." in dotted else "the top level"
    msg = f"unknown key {dotted!r} (valid keys of {owner}: {', '.join(valid)})"
    close = difflib.get_close_matches(name, valid, n=1)
    return ConfigError(msg + (f"; did you mean {close[0]!r}?" if close else ""))


def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


_RULE_ERRORS = (
    "literal_error",
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "finite_number",
)


def _locate(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel], FieldInfo | None, list]:
    """The model that owns the field at ``loc``, that field (None if loc ends at a model or
    names no field), and the rest of ``loc`` below the field (list indices, dict keys)."""
    owner, field, rest = model, None, list(loc)
    while rest and isinstance(rest[0], str) and rest[0] in owner.model_fields:
        field = owner.model_fields[rest.pop(0)]
        sub, _ = base_type(field.annotation)
        if not (rest and isinstance(sub, type) and issubclass(sub, BaseModel)):
            break
        owner, field = sub, None
    return owner, field, rest


def _message(err: dict, model: type[BaseModel], loc: tuple) -> str:
    """One pydantic error as a sentence: ``<key> must be <rule>, got <value>``,
    ``<key>: cannot convert <value> to <type>``, ``unknown key ...``."""
    key, value, kind = _dotted(loc), err["input"], err["type"]
    cause = (err.get("ctx") or {}).get("error")
    owner, field, rest = _locate(model, tuple(err["loc"]))
    if kind in ("extra_forbidden", "invalid_key"):
        return str(unknown_key(".".join(map(str, loc)), list(owner.model_fields)))
    if field is None:
        return f"{key or 'the config'}: {err['msg']}, got {value!r}"
    tp, _ = base_type(field.annotation)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"{key} must be a mapping, got {value!r}"
    if kind == "value_error":
        return f"{key} {cause}, got {value!r}"
    text = None if rest else rule(field)
    if kind in _RULE_ERRORS and text is not None:
        return f"{key} must be {text}, got {value!r}"
    if kind == "finite_number":
        return f"{key} must be a finite number, got {value!r}"
    annotation = field.annotation
    for _ in rest:  # into a list item or a dict value
        annotation = (typing.get_args(_strip(annotation)[0]) or (Any,))[-1]
    return f"{key}: cannot convert {value!r} to {type_name(annotation)}"


def config_error(
    exc: ValidationError,
    model: type[BaseModel],
    prefix: tuple = (),
    where: Callable[[tuple], str] | None = None,
) -> ConfigError:
    """One ConfigError for a ValidationError: one line per bad key (its first error).
    ``where(loc)`` may add e.g. `` (in exp.yaml)`` to the lines composed here."""
    lines: dict[str, str] = {}
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        if _dotted(loc) in lines:
            continue
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # from a validator (registry, cross-field): as is
            lines[_dotted(loc)] = str(cause)
        else:
            lines[_dotted(loc)] = _message(err, model, loc) + (where(loc) if where else "")
    return ConfigError("\n".join(lines.values()))


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    """Frozen, unknown keys refused; construction errors become one ConfigError."""

    # the dotted key of this model in the experiment ("train", "method.lgtm"): the prefix of
    # the keys its errors name when it is built on its own
    key: ClassVar[str] = ""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        coerce_numbers_to_str=True,  # run_name: 2024 -> "2024"
        allow_inf_nan=False,
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            prefix = tuple(type(self).key.split(".")) if type(self).key else ()
            raise config_error(e, type(self), prefix) from None

    # Marked like pydantic's own __init__, pydantic does not call this one for a nested section:
    # validating a whole tree reports the errors of every section at once (with their file).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


class Options(_Model):
    """A section of the experiment, or a component's own options (a method's hyper-parameters):
    every field's raw value goes through :func:`lenient`."""

    @field_validator("*", mode="before")
    @classmethod
    def _lenient(cls, value: Any, info: ValidationInfo) -> Any:
        return lenient(value, cls.model_fields[info.field_name].annotation)
