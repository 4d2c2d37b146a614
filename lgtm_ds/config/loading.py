"""From files and flags to an :class:`ExperimentConfig`, and back to YAML.

``load_config``: read the YAML into a plain dict, set each override in it (in order, later wins),
validate the merged dict once. ``parse_args``: the command line -> ``load_config``.
``config_to_dict`` / ``save_resolved`` / ``dump_default_yaml``: the way out.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..io import atomic_write_text
from ..options import base_type, config_error, rule, type_name
from ..options import unknown_key as _unknown_key
from . import schema

# --------------------------------------------------------------------------------------------
# YAML + overrides
# --------------------------------------------------------------------------------------------


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment YAML {str(path)!r} does not exist (or is not a file)")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"experiment YAML {str(path)!r} does not parse: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"experiment YAML {str(path)!r}: the top level must be a mapping of "
            f"sections, got {type(data).__name__}"
        )
    return data


def _yaml_or_raw(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _is_section(annotation: Any) -> bool:
    tp = base_type(annotation)[0]
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _canonical(parts: list[str]) -> list[str]:
    """A flat method option (``method.fd_radius``) -> its place (``method.lgtm.fd_radius``)."""
    if len(parts) >= 2 and parts[0] == "method":
        return ["method", *schema.SECTIONS["method"].canonical(parts[1]), *parts[2:]]
    return parts


def _resolve(dotted: str) -> tuple[list[str], Any, int]:
    """``section[.sub].key[.deep...]`` -> (its parts, flat method options moved into their
    method's section; the annotation of the field they name (None: a section); how many parts
    name sections and that field: the rest reach into a dict field). ConfigError for an
    unknown key or a sub-key of a field that is neither a section nor a dict."""
    parts = dotted.split(".")
    if "" in parts:
        raise ConfigError(f"malformed key {dotted!r} (expected section.key)")
    sections = schema.SECTIONS
    if parts[0] not in sections:
        raise _unknown_key(parts[0], list(sections))
    parts = _canonical(parts)
    model: type[BaseModel] = sections[parts[0]]
    for i in range(1, len(parts)):
        fields = model.model_fields
        if parts[i] not in fields:
            raise _unknown_key(".".join(parts[: i + 1]), list(fields))
        annotation = fields[parts[i]].annotation
        if _is_section(annotation):
            model = base_type(annotation)[0]
            continue
        if len(parts) > i + 1 and base_type(annotation)[0] is not dict:
            raise ConfigError(
                f"{dotted!r}: {'.'.join(parts[: i + 1])} is a {type_name(annotation)}, it has "
                "no sub-keys"
            )
        return parts, annotation, i + 1
    return parts, None, len(parts)


def _nest_flat(data: dict) -> dict:
    """The YAML's flat method options moved into their method's section (as validation would;
    here, so that a command-line override of either spelling finds one place)."""
    method = data.get("method")
    if not isinstance(method, dict):
        return data
    canonical = schema.SECTIONS["method"].canonical
    nested = {k: v for k, v in method.items() if len(canonical(str(k))) == 1}
    for key, value in method.items():
        path = canonical(str(key))
        if len(path) == 1:
            continue
        owner, leaf = path
        section = nested.get(owner) or {}
        if not isinstance(section, dict):
            continue  # validation names the bad section
        if leaf in section:
            raise ConfigError(
                f"method.{leaf} and method.{owner}.{leaf} are both set; keep method.{owner}.{leaf}"
            )
        nested[owner] = {**section, leaf: value}
    data["method"] = nested
    return data


def _override_items(overrides: list[str] | dict | None) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [(str(k), v) for k, v in overrides.items()]
    items = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        k, v = item.split("=", 1)
        items.append((k.strip().removeprefix("--"), v))
    return items


def _set(data: dict, dotted: str, value: Any) -> set[tuple[str, ...]]:
    """Set ``dotted`` in the plain dict ``data``; returns the (section, key) pairs it set.

    A value at ``section.key`` stays as given (validation converts it to the field's type).
    Deeper keys go inside a dict field, creating dicts on the way; a string there is read as
    YAML, so ``deepspeed.teacher.zero_optimization.stage=3`` sets the int 3. A whole section
    (a mapping, or its YAML text) is set key by key. Where the YAML holds a non-mapping in the
    way, nothing is set: validation then reports that value.
    """
    parts, annotation, named = _resolve(dotted)
    dotted = ".".join(parts)
    if annotation is None:  # a whole section (or a method's section): key by key
        if isinstance(value, str):
            value = _yaml_or_raw(value)
        if isinstance(value, dict):
            return {kk for k, v in value.items() for kk in _set(data, f"{dotted}.{k}", v)}
        if len(parts) == 1:
            data[dotted] = value  # validation: "<section> must be a mapping"
            return {(dotted,)}
    section = data.setdefault(parts[0], {})
    if section is None:  # "train:" with nothing under it
        section = data[parts[0]] = {}
    if not isinstance(section, dict):
        return set()
    node, key = section, parts[1]
    for p in parts[2:]:
        child = node.get(key)
        if isinstance(child, str):  # a flow mapping given as text: "{zero_optimization: ...}"
            child = _yaml_or_raw(child)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            if node is section:
                return set()
            child = {}
        node[key] = child
        node, key = child, p
    if len(parts) > named and isinstance(value, str) and value.strip():
        value = _yaml_or_raw(value)  # inside a dict field: YAML, as the file would hold it
    node[key] = value
    return {tuple(parts[:2])}


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None
) -> schema.ExperimentConfig:
    """Read the experiment YAML (None: no file, all defaults), apply ``overrides`` in order
    (later wins), then validate the merged dict once.

    ``overrides``: ``["train.student_lr=1e-3", ...]`` or ``{"train.student_lr": 1e-3}`` or nested
    ``{"train": {"student_lr": 1e-3}}``; deep keys into dict fields work
    (``deepspeed.teacher.zero_optimization.stage=3``).
    """
    data = {} if path is None else _nest_flat(_read_yaml(path))
    from_file = {(s,) for s in data}
    from_file |= {(s, k) for s, sec in data.items() if isinstance(sec, dict) for k in sec}
    overridden: set[tuple[str, ...]] = set()
    for dotted, value in _override_items(overrides):
        overridden |= _set(data, dotted, value)

    def where(loc: tuple) -> str:
        return f" (in {path})" if loc[:2] in from_file - overridden else ""

    try:
        return schema.ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise config_error(e, schema.ExperimentConfig, where=where) from None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print the usage and exit(2)
        missing = re.match(r"argument (--[\w-]+)\S*: expected one argument", message)
        raise ConfigError(f"{missing[1]} needs a value" if missing else message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        usage="%(prog)s [--config PATH] [--ds_config PATH] [--log_level LEVEL] [--local_rank N] "
        "[--section.key=VALUE | --section.key VALUE ...]",
        description="The experiment is the YAML of --config (default: every key at its default,\n"
        "see configs/default.yaml) with --section.key=VALUE overrides on top, applied in\n"
        "order (later wins). A bare --section.key sets a true/false key to true. Deep keys\n"
        "into deepspeed.teacher / deepspeed.student work:\n"
        "  --deepspeed.teacher.zero_optimization.stage=3",
        epilog=_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="PATH", help="experiment YAML")
    p.add_argument(
        "--ds_config", metavar="PATH", help="DeepSpeed JSON: the same as --deepspeed.config=PATH"
    )
    p.add_argument(
        "--log_level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="console chatter of the ranks: warning (default) hides DeepSpeed's INFO lines, "
        "library deprecation warnings and data/saving progress bars; info shows them (the "
        "launcher's own lines: `deepspeed --log_level` / `deepspeed -q` before the script)",
    )
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        metavar="N",
        help="set by the DeepSpeed launcher (default: env LOCAL_RANK, else -1)",
    )
    return p


def _overrides_from_flags(rest: list[str]) -> list[str]:
    """``--section.key=value`` / ``--section.key value`` / bare ``--section.bool_key`` ->
    ``section.key=value`` strings, in order."""
    overrides = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        i += 1
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(
                f"unexpected command-line argument {tok!r} (flags look like --section.key=value)"
            )
        name, eq, value = tok[2:].partition("=")
        if "." not in name:
            raise ConfigError(
                f"unknown flag '--{name}' (known: --config, --ds_config, --log_level, "
                f"--local_rank, --section.key=value with sections {', '.join(schema.SECTIONS)})"
            )
        try:
            parts, annotation, named = _resolve(name)
        except ConfigError as e:
            raise ConfigError(f"unknown flag '--{name}': {e}") from None
        if not eq:
            if i < len(rest) and not rest[i].startswith("--"):
                value, i = rest[i], i + 1
            elif len(parts) == named and base_type(annotation)[0] is bool:
                value = "true"  # bare --output.overwrite
            else:
                raise ConfigError(f"--{name} needs a value (--{name}=VALUE)")
        overrides.append(f"{name}={value}")
    return overrides


def parse_args(
    argv: list[str] | None = None,
) -> tuple[schema.ExperimentConfig, argparse.Namespace]:
    """Parse ``argv`` (default ``sys.argv[1:]``); ``-h`` prints every key and exits.

    Returns ``(cfg, args)``; ``args`` has ``config`` (YAML path or None), ``ds_config``,
    ``log_level``,
    ``local_rank`` (int; the flag, else env LOCAL_RANK, else -1; not otherwise used) and
    ``overrides`` (the ``section.key=value`` strings in the order applied; ``--ds_config`` comes
    first as ``deepspeed.config=...``, so a ``--deepspeed.config`` flag wins over it).
    """
    args, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else list(argv))
    overrides = [f"deepspeed.config={args.ds_config}"] if args.ds_config is not None else []
    overrides += _overrides_from_flags(rest)
    if args.local_rank is None:
        env = os.environ.get("LOCAL_RANK", "-1")
        try:
            args.local_rank = int(env)
        except ValueError:
            raise ConfigError(f"env LOCAL_RANK: cannot convert {env!r} to int") from None
    args.overrides = overrides
    return load_config(args.config, overrides), args


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def config_to_dict(cfg: schema.ExperimentConfig) -> dict:
    """Plain nested dict (YAML-dumpable); ``load_config`` of its dump gives back ``cfg``."""
    return cfg.model_dump()


def save_resolved(
    cfg: schema.ExperimentConfig, teacher_ds: dict, student_ds: dict, path: str | os.PathLike
) -> None:
    """Write ``{experiment, deepspeed_teacher, deepspeed_student}`` as one YAML, atomically.
    Call it on rank 0 only."""
    doc = {
        "experiment": config_to_dict(cfg),
        "deepspeed_teacher": copy.deepcopy(teacher_ds),
        "deepspeed_student": copy.deepcopy(student_ds),
    }
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))


def _inline(value: Any) -> str:
    """A value as one line of YAML: ``null``, ``0.001``, ``[text]``, ``{}``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


class _Doc(NamedTuple):
    key: str  # dotted, e.g. "method.lgtm.fd_radius"
    value: str | None  # the default as one line of YAML; None: a section
    doc: str  # the description (and the rule)


def _docs(model: type[BaseModel] | None = None, prefix: str = "") -> Iterator[_Doc]:
    """Every section and key of the experiment, depth first, in the schema's order."""
    model = model or schema.ExperimentConfig
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if _is_section(field.annotation):
            yield _Doc(key, None, str(field.description))
            yield from _docs(base_type(field.annotation)[0], key + ".")
            continue
        text = rule(field)  # never wrapped inside: its spaces are no-break spaces
        doc = str(field.description) + (" (" + text.replace(" ", "\xa0") + ")" if text else "")
        yield _Doc(key, _inline(field.get_default(call_default_factory=True)), doc)


def _wrap(text: str, width: int) -> list[str]:
    lines = textwrap.wrap(text, width=width, break_on_hyphens=False)
    return [line.replace("\xa0", " ") for line in lines]


_HEADER = """\
# LGTM-DS default experiment: small embedded BERTs on synthetic data, runs offline on CPU.
# Every key of every section with its default; an experiment YAML lists only what it changes,
# and `--section.key=value` on the command line overrides both.
# The DeepSpeed JSON (deepspeed.config) says "auto" for the values this file owns: batch sizes,
# accumulation, clipping and precision.
# Generated from lgtm_ds/config/schema.py: python -m lgtm_ds.config > configs/default.yaml
"""


def dump_default_yaml() -> str:
    """Every section and key with its default, its description as a trailing comment."""
    rows = []
    for d in _docs():
        depth, leaf = d.key.count("."), d.key.rsplit(".", 1)[-1]
        left = "  " * depth + (f"{leaf}:" if d.value is None else f"{leaf}: {d.value}")
        rows.append((depth, left, d.doc))
    col = 1 + max(len(left) for _, left, _ in rows)
    out = [_HEADER.rstrip("\n")]
    for depth, left, doc in rows:
        if depth == 0:
            out.append("")
        lines = _wrap(doc, width=100 - col - 2)
        out.append(f"{left:<{col}}# {lines[0]}")
        out.extend(f"{'':<{col}}# {more}" for more in lines[1:])
    return "\n".join(out) + "\n"


def _keys_help() -> str:
    out = ["experiment keys (--section.key=VALUE; the default after '='):"]
    for d in _docs():
        indent = "  " * (d.key.count(".") + 1)
        if d.value is None:
            out.append(f"{indent}{d.key}: {d.doc}")
            continue
        out.append(f"{indent}--{d.key}={d.value}")
        out.extend(" " * (len(indent) + 4) + line for line in _wrap(d.doc, width=88))
    return "\n".join(out)


_MD_HEADER = """\
# Configuration

<!-- Generated from lgtm_ds/config/schema.py and the methods' options by
     `python -m lgtm_ds.config --markdown > docs/configuration.md`; tests/unit/test_config.py
     fails when it is out of date. Edit the schema, not this file. -->

An experiment is a YAML file validated into a typed tree of pydantic models. Every key below
has its default; a YAML lists only what it changes, and `--section.key=value` on the command
line overrides both (`python launch/train.py --help` prints the same list).
[`configs/default.yaml`](../configs/default.yaml) is every key at its default.

Each method's own hyper-parameters live in its section, `method.<name>.*`, defined beside the
method (`Method.Options`). The flat spelling of 0.9 (`method.fd_radius`,
`method.influence_scale`, `method.pilot_lr`, ...) is still accepted and moved into its section.
"""


def dump_configuration_md() -> str:
    """``docs/configuration.md``: one table per section (key, default, meaning)."""
    out = [_MD_HEADER]
    for d in _docs():
        if d.value is None:
            out += ["", f"## `{d.key}`" if "." not in d.key else f"### `{d.key}`", "", d.doc, ""]
            out += ["| key | default | meaning |", "|---|---|---|"]
            continue
        doc = d.doc.replace("\xa0", " ").replace("|", "\\|")
        value = d.value.replace("|", "\\|")
        out.append(f"| `{d.key}` | `{value}` | {doc} |")
    return "\n".join(out) + "\n"
