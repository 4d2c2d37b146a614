"""Students made from a teacher: a subset of its layers (DistilBERT's initialisation) or a
randomly initialised model of its architecture and vocabulary at another depth or width.

Both work on any Hugging Face model whose blocks sit in one ``nn.ModuleList`` with
``config.num_hidden_layers`` entries (BERT ``bert.encoder.layer``, Llama / Qwen / Mistral
``model.layers``, GPT-2 ``transformer.h``, ...), encoder or decoder. The student is built fresh
from the teacher's config with ``num_hidden_layers`` set to the new depth, so everything the
model derives from its config is consistent by construction: each block's ``layer_idx`` (the
KV-cache slot a decoder block writes) counts 0..k-1, the rotary tables and attention settings
are the teacher's, and tied input/output embeddings stay tied. Per-layer config lists
(``layer_types``, ...) are cut to the kept layers. Then every weight is copied from the teacher,
block ``j`` of the student from block ``layers[j]`` of the teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError, ModelError
from . import hf

FROM_TEACHER = "from_teacher"  # model.student: the student is derived from the teacher


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, module list)`` of the model's transformer blocks: the one
    ``nn.ModuleList`` with ``config.num_hidden_layers`` entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and n is not None and len(mod) == n
    ]
    if len(found) != 1:
        raise ModelError(
            f"cannot derive a student from a {type(model).__name__}: expected one list of "
            f"{n} blocks (config.num_hidden_layers), found {len(found)} "
            f"({', '.join(name for name, _ in found) or 'none'})"
        )
    return found[0]


def resolve_layers(
    n_teacher: int, layers: Sequence[int] | None, stride: int | None
) -> list[int] | None:
    """The teacher block indices to keep (``model.student_layers`` or every ``stride``-th from
    0), checked against the teacher's depth; None when neither is set."""
    if layers is not None and stride is not None:
        raise ConfigError("model.student_layers and model.student_layer_stride: set one, not both")
    if stride is not None:
        if stride < 1:
            raise ConfigError(f"model.student_layer_stride must be >= 1, got {stride}")
        return list(range(0, n_teacher, stride))
    if layers is None:
        return None
    out = [int(i) for i in layers]
    if not out:
        raise ConfigError("model.student_layers is empty: list the teacher layers to keep")
    bad = [i for i in out if not 0 <= i < n_teacher]
    if bad:
        raise ConfigError(
            f"model.student_layers {bad} out of range: the teacher has {n_teacher} layers "
            f"(0..{n_teacher - 1})"
        )
    if len(set(out)) != len(out):
        raise ConfigError(f"model.student_layers {out} repeats a layer")
    return out


def _cut_per_layer_lists(cfg, n_teacher: int, keep: list[int]) -> None:
    """Config attributes that hold one entry per layer (``layer_types``, ...) keep the kept
    layers' entries."""
    for key, value in list(cfg.to_dict().items()):
        if isinstance(value, list) and len(value) == n_teacher and key != "architectures":
            setattr(cfg, key, [value[i] for i in keep])


def student_config(teacher: nn.Module, overrides: dict | None, layers: list[int] | None):
    """The teacher's config with the student's depth (``layers``) or ``overrides`` applied;
    unknown override keys are one ConfigError naming them."""
    cfg = copy.deepcopy(teacher.config)
    n_teacher = cfg.num_hidden_layers
    if layers is not None:
        _cut_per_layer_lists(cfg, n_teacher, layers)
        cfg.num_hidden_layers = len(layers)
    for key, value in (overrides or {}).items():
        if not hasattr(cfg, key):
            raise ConfigError(
                f"model.student_config: {type(cfg).__name__} has no key {key!r} (e.g. "
                f"num_hidden_layers, hidden_size, intermediate_size, num_attention_heads)"
            )
        setattr(cfg, key, value)
    if overrides and "num_hidden_layers" in overrides:
        k = int(overrides["num_hidden_layers"])
        if k < 1:
            raise ConfigError(f"model.student_config.num_hidden_layers must be >= 1, got {k}")
        _cut_per_layer_lists(cfg, n_teacher, list(range(min(k, n_teacher))))
    if "quantization_config" in cfg.__dict__:  # a dequantised GGUF teacher: the student is plain
        del cfg.quantization_config
    return cfg


def derive_student(
    teacher: nn.Module,
    *,
    layers: Sequence[int] | None = None,
    stride: int | None = None,
    config: dict | None = None,
    seed: int = 0,
) -> nn.Module:
    """A student made from ``teacher`` (not modified):

    - ``layers`` / ``stride``: the teacher with only those blocks, every weight copied
      (embeddings, kept blocks in order, final norm, heads);
    - ``config``: a random-init model of the teacher's class with these config overrides
      (depth, width, heads...), initialised from ``seed``.
    """
    keep = resolve_layers(teacher.config.num_hidden_layers, layers, stride)
    if keep is None and not config:
        raise ConfigError(
            f"model.student={FROM_TEACHER!r} needs model.student_layers, "
            "model.student_layer_stride or model.student_config"
        )
    if keep is not None and config:
        raise ConfigError(
            "model.student_config (a random-init student) and model.student_layers / "
            "model.student_layer_stride (teacher weights) exclude each other"
        )
    cfg = student_config(teacher, config, keep)
    try:
        with hf.seeded(seed):
            student = type(teacher)(cfg)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. hidden size not divisible by the heads
        raise ConfigError(
            f"model.student_config {config}: {type(teacher).__name__} cannot be built with it: "
            f"{type(e).__name__}: {e}"
        ) from e
    student.to(next(teacher.parameters()).dtype)
    if keep is None:
        return student
    t_name, _ = block_list(teacher)
    prefix = t_name + "."
    src = teacher.state_dict()
    mapped = {}
    for key in student.state_dict():
        if key.startswith(prefix):
            j, rest = key[len(prefix) :].split(".", 1)
            mapped[key] = src[f"{prefix}{keep[int(j)]}.{rest}"]
        else:
            mapped[key] = src[key]
    student.load_state_dict(mapped, strict=True)
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    return student
