"""The ``method`` section of the experiment, collected from the method registry.

The keys every method shares sit in the section itself: ``method.name``, the two objectives'
weights and divergences (:class:`~lgtm_ds.methods.base.DistillOptions`), the hidden-state
term (:class:`~lgtm_ds.methods.hidden.HiddenOptions`) and on-policy sampling
(:class:`~lgtm_ds.methods.onpolicy.OnPolicyOptions`). A method with hyper-parameters of its own
declares them once, beside the method, as ``Method.Options`` (an
:class:`~lgtm_ds.options.Options` model); they are the nested section named after it
(``method.lgtm.fd_radius``, ``method.metadistil.pilot_lr``). The registry is the one list:
registering a method, inside the package or outside it, adds its section (torchtitan's
configurable components; TRL's per-trainer config classes).

The experiment (``lgtm_ds.config``), the :class:`~lgtm_ds.methods.distiller.Distiller` and the
reference form (``methods/naive.py``) all validate through :func:`method_config`, so a default
exists once. Flat keys (``method.fd_radius``: the spelling before 0.10) are still accepted and
moved into the section of the first method registered with that option (the built-in methods'
option names are unique, and none may shadow a shared key: :func:`build_method_config`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from ..errors import ConfigError
from ..options import Options, config_error
from .base import METHODS, DistillOptions
from .hidden import HiddenOptions
from .onpolicy import OnPolicyOptions


class _Named(Options):
    name: str = Field(
        "lgtm",
        description="distillation method, by its name in the registry of lgtm_ds.methods",
        # the registry is the one list of methods: the docs ask it (rule()), so does _registered
        json_schema_extra={"choices": "lgtm_ds.methods:method_names"},
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        METHODS.get(value)  # ConfigError naming the registered methods
        return value


class MethodSection(OnPolicyOptions, HiddenOptions, DistillOptions, _Named):
    """The shared keys; :func:`build_method_config` adds one nested section per method that has
    options of its own."""

    key: ClassVar[str] = "method"
    # flat option name -> the method whose section holds it (filled by build_method_config)
    flat_keys: ClassVar[dict[str, str]] = {}

    @classmethod
    def canonical(cls, key: str) -> list[str]:
        """``"fd_radius"`` -> ``["lgtm", "fd_radius"]``; any other key as it is."""
        owner = cls.flat_keys.get(key)
        return [owner, key] if owner is not None else [key]

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(k in cls.flat_keys for k in data):
            return data
        data = dict(data)
        for key in [k for k in data if k in cls.flat_keys]:
            owner = cls.flat_keys[key]
            section = data.get(owner)
            section = dict(section) if isinstance(section, dict) else {}
            if key in section:
                raise ConfigError(
                    f"method.{key} and method.{owner}.{key} are both set; keep method.{owner}.{key}"
                )
            section[key] = data.pop(key)
            data[owner] = section
        return data


def build_method_config() -> type[MethodSection]:
    """The ``method`` section's class for the methods registered now."""
    shared = set(MethodSection.model_fields)
    fields: dict[str, Any] = {}
    flat: dict[str, str] = {}
    for name, method in METHODS.items():
        options = method.Options
        if options is None:
            continue
        if name in shared:
            raise TypeError(f"method {name!r}: its section would hide the key method.{name}")
        for key in options.model_fields:
            if key in shared:
                raise TypeError(
                    f"method {name!r}: option {key!r} is a shared key of the method section "
                    f"(method.{key}); rename it"
                )
            # the first method registered with a key keeps its flat spelling (a subclass that
            # inherits its parent's options is spelled method.<name>.<key> only)
            flat.setdefault(key, name)
        options.key = f"method.{name}"
        doc = (options.__doc__ or f"{name}'s own hyper-parameters").strip().split("\n")[0]
        fields[name] = (options, Field(default_factory=options, description=doc))
    model = create_model("MethodConfig", __base__=MethodSection, **fields)
    model.flat_keys = flat
    return model


_current: type[MethodSection] | None = None
# one class per set of methods with options: a method registered and removed again (a test)
# leaves the section the very class it was, so code that imported it keeps a valid class
_built: dict[tuple, type[MethodSection]] = {}


def method_config_class() -> type[MethodSection]:
    """The ``method`` section's class, rebuilt after the registry changes."""
    global _current
    if _current is None:
        key = tuple((name, m.Options) for name, m in METHODS.items() if m.Options is not None)
        if key not in _built:
            _built[key] = build_method_config()
        _current = _built[key]
    return _current


def _registry_changed() -> None:
    global _current
    _current = None


METHODS.on_change(_registry_changed)


def method_config(
    method: str | None = None, config: MethodSection | None = None, **overrides: Any
) -> MethodSection:
    """The ``method`` section for ``method`` (default: ``config``'s, else ``"lgtm"``): the
    defaults, or ``config``, with ``overrides`` (keys of the section, flat or nested, e.g.
    ``alpha_student=1.0``, ``fd_radius=1e-3``, ``lgtm={"influence_scale": 2.0}``) on top.
    One ConfigError naming every bad key."""
    cls = method_config_class()
    data: dict[str, Any] = config.model_dump() if config is not None else {}
    data["name"] = method or data.get("name", "lgtm")
    for key, value in overrides.items():
        *owner, leaf = cls.canonical(key)
        node = data
        for part in owner:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise config_error(e, cls, ("method",)) from None
