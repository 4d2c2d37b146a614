"""Intermediate-layer (hidden-state) distillation, usable with every method.

``method.hidden_weight > 0`` adds to the student's loss

    H = hidden_weight * mean over pairs (i <- j) of  D(P_i h_s^i, h_t^j)

where ``h^i`` is the output of transformer block ``i`` (1-based) of a model, ``D`` the mean
squared error over the hidden size (``mse``) or ``1 - cos`` (``cosine``), averaged over the
positions the attention mask keeps (``hidden_positions: all``) or the first position only
(``first``: PKD's [CLS] for classifiers), and ``P_i`` a learned linear map
``[d_student -> d_teacher]`` when the widths differ (identity otherwise). The projections are
a submodule of the student (``HIDDEN_PROJ``), trained by the student's optimizer and engine
(ZeRO included), saved in checkpoints, left out of the saved Hugging Face model.

Where the teacher learns from its own loss (online KD, LGTM's ``L_t``), its loss gets the same
term with the student's projected states as the target, so the gradient reaches both models.
MetaDistil's meta-gradient differentiates the logit terms only (the hidden-state target is a
constant there). Layer map: ``method.hidden_layers`` as ``"i:j"`` strings (student block ``i``
learns from teacher block ``j``); null = PKD's skip map ``j = round(i * L_t / L_s)`` for
``i = 1..L_s``.

Block outputs are taken with forward hooks on the models' block list (the ``nn.ModuleList`` of
``config.num_hidden_layers`` blocks: BERT's ``encoder.layer``, GPT-2's ``h``, Llama's
``layers``), registered only inside :meth:`HiddenKD.capture`: other passes (the look-ahead,
the perturbed forwards, evaluation) and activation-checkpointing recomputations see none.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..errors import ConfigError, ModelError
from ..options import Options

HIDDEN_PROJ = "lgtm_hidden_proj"  # the student's submodule holding the projections


@dataclass(frozen=True)
class HiddenSpec:
    weight: float = 0.0
    layers: tuple[str, ...] | None = None  # "i:j" pairs; None = the skip map
    loss: str = "mse"
    positions: str = "all"

    @classmethod
    def of(cls, options: HiddenOptions) -> HiddenSpec:
        """From the ``method`` section (its :class:`HiddenOptions` fields)."""
        layers = tuple(options.hidden_layers) if options.hidden_layers is not None else None
        return cls(options.hidden_weight, layers, options.hidden_loss, options.hidden_positions)


def parse_layers(layers) -> list[tuple[int, int]] | None:
    """``["1:2", "2:4"]`` -> ``[(1, 2), (2, 4)]``; ConfigError naming ``method.hidden_layers``."""
    if layers is None:
        return None
    pairs = []
    for item in layers:
        parts = str(item).split(":")
        try:
            i, j = (int(p) for p in parts)
            if len(parts) != 2 or i < 1 or j < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"method.hidden_layers: {item!r} is not 'student_block:teacher_block' with "
                f"blocks counted from 1 (e.g. '2:4')"
            ) from None
        pairs.append((i, j))
    if not pairs:
        raise ConfigError("method.hidden_layers is empty; null = the default map")
    seen = [i for i, _ in pairs]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"method.hidden_layers: a student block appears twice in {layers}")
    return pairs


class HiddenOptions(Options):
    """The hidden-state term's keys, ``method.hidden_*`` (any method)."""

    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the hidden-state (intermediate-layer) distillation term, any "
        "method; 0 = off (lgtm_ds/methods/hidden.py)",
    )
    hidden_layers: list[str] | None = Field(
        None,
        description='layer map, "student_block:teacher_block" pairs counted from 1, e.g. '
        '["1:2", "2:4"]; null = the skip map j = round(i * L_teacher / L_student)',
    )
    hidden_loss: Literal["mse", "cosine"] = Field(
        "mse", description="hidden-state distance: mean squared error, or 1 - cosine"
    )
    hidden_positions: Literal["all", "first"] = Field(
        "all",
        description="positions compared: every attended token, or the first only (PKD's [CLS], "
        "classifiers)",
    )

    @field_validator("hidden_layers")
    @classmethod
    def _layer_map(cls, value: list[str] | None) -> list[str] | None:
        parse_layers(value)  # ConfigError naming method.hidden_layers
        return value


def block_list(model: nn.Module, role: str) -> nn.ModuleList:
    """The model's transformer blocks: its ``nn.ModuleList`` of ``num_hidden_layers`` modules."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if name.startswith(HIDDEN_PROJ):
            continue
        if isinstance(mod, nn.ModuleList) and n is not None and len(mod) == n:
            return mod
    raise ModelError(
        f"hidden-state distillation: cannot find the {role}'s blocks (an nn.ModuleList of "
        f"config.num_hidden_layers={n} modules) in {type(model).__name__}"
    )


def _width(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def layer_pairs(spec: HiddenSpec, teacher: nn.Module, student: nn.Module) -> list[tuple[int, int]]:
    """The (student block, teacher block) pairs, checked against both models."""
    n_t = len(block_list(teacher, "teacher"))
    n_s = len(block_list(student, "student"))
    pairs = parse_layers(spec.layers)
    if pairs is None:
        return [(i, max(1, round(i * n_t / n_s))) for i in range(1, n_s + 1)]
    for i, j in pairs:
        if i > n_s or j > n_t:
            raise ConfigError(
                f"method.hidden_layers: pair '{i}:{j}' is out of range: the student has {n_s} "
                f"blocks, the teacher {n_t}"
            )
    return pairs


def attach_projection(
    student: nn.Module, teacher: nn.Module, spec: HiddenSpec, seed: int = 0
) -> list[nn.Parameter]:
    """Add the learned projections to ``student`` (before its engine is built) when the hidden
    sizes differ; returns their parameters (empty when none are needed or already there)."""
    if spec.weight <= 0 or hasattr(student, HIDDEN_PROJ):
        return []
    d_s, d_t = _width(student), _width(teacher)
    if d_s == d_t:
        return []
    pairs = layer_pairs(spec, teacher, student)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    dtype = next(student.parameters()).dtype
    proj = nn.ModuleList()
    for _ in pairs:
        lin = nn.Linear(d_s, d_t, dtype=dtype)
        with torch.no_grad():  # Xavier-uniform from our own generator: no global RNG draw
            bound = (6.0 / (d_s + d_t)) ** 0.5
            lin.weight.copy_(torch.rand(d_t, d_s, generator=g, dtype=torch.float64) * 2 - 1)
            lin.weight.mul_(bound)
            lin.bias.zero_()
        proj.append(lin)
    student.add_module(HIDDEN_PROJ, proj)
    return list(proj.parameters())


class HiddenKD:
    """The hidden-state term of one run (a no-op when ``spec.weight == 0``)."""

    def __init__(self, spec: HiddenSpec, teacher: nn.Module | None, student: nn.Module | None):
        self.spec = spec
        self.on = spec.weight > 0
        self.totals: dict[str, float] = {}
        if not self.on:
            return
        if spec.loss not in ("mse", "cosine"):
            raise ConfigError(f"method.hidden_loss must be mse or cosine, got {spec.loss!r}")
        if spec.positions not in ("all", "first"):
            raise ConfigError(
                f"method.hidden_positions must be all or first, got {spec.positions!r}"
            )
        self.pairs = layer_pairs(spec, teacher, student)
        self.blocks = {
            "teacher": block_list(teacher, "teacher"),
            "student": block_list(student, "student"),
        }
        self.proj = getattr(student, HIDDEN_PROJ, None)
        if self.proj is None and _width(student) != _width(teacher):
            raise ConfigError(
                f"hidden-state distillation between widths {_width(student)} (student) and "
                f"{_width(teacher)} (teacher) needs the projection: call "
                f"lgtm_ds.methods.hidden.attach_projection(student, teacher, spec) before the "
                f"student's engine is built"
            )

    @contextlib.contextmanager
    def capture(self, role: str):
        """``with hidden.capture("student") as states:`` records the role's block outputs of
        the forward run inside the block (``states[k]`` for pair ``k``)."""
        states: dict[int, torch.Tensor] = {}
        if not self.on:
            yield states
            return
        handles = []
        for k, (i, j) in enumerate(self.pairs):
            block = self.blocks[role][(i if role == "student" else j) - 1]

            def hook(_mod, _inp, out, k=k):
                states[k] = out[0] if isinstance(out, tuple | list) else out

            handles.append(block.register_forward_hook(hook))
        try:
            yield states
        finally:
            for h in handles:
                h.remove()

    def loss(self, student: dict, teacher: dict, batch: dict, learner: str) -> torch.Tensor:
        """``H`` with the other role's states as a constant target (``learner``'s get the
        gradient; the projections learn with the student)."""
        mask = self._mask(batch)
        total = 0.0
        for k in range(len(self.pairs)):
            hs, ht = student[k], teacher[k]
            if self.proj is not None:
                if learner == "student":
                    hs = self.proj[k](hs)
                else:
                    with torch.no_grad():
                        hs = self.proj[k](hs)
            if learner == "student":
                ht = ht.detach()
            else:
                hs = hs.detach()
            total = total + _pair_loss(hs, ht, mask, self.spec.loss, self.spec.positions)
        return self.spec.weight * total / len(self.pairs)

    def add(self, loss, student: dict, teacher: dict, batch: dict, learner: str, share=1.0):
        """``loss + H`` (``loss`` unchanged when off); ``share``: this micro-batch's share of
        the step, for the ``<learner>_hidden_loss`` metric."""
        if not self.on:
            return loss
        h = self.loss(student, teacher, batch, learner)
        if share:
            key = f"{learner}_hidden_loss"
            self.totals[key] = self.totals.get(key, 0.0) + float(h.detach()) * share  # host sync
        return loss + h

    def pop_metrics(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out

    def _mask(self, batch: dict) -> torch.Tensor | None:
        if self.spec.positions == "first":
            return None
        m = batch.get("attention_mask")
        return None if m is None else m.bool()


def _pair_loss(hs, ht, mask, kind: str, positions: str) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(hs.dtype, ht.dtype), torch.float32)
    hs, ht = hs.to(dtype), ht.to(dtype)
    if hs.shape != ht.shape:
        raise ModelError(
            f"hidden-state distillation: student states {tuple(hs.shape)} vs teacher states "
            f"{tuple(ht.shape)} (after the projection); the two models must see the same "
            f"tokens"
        )
    if positions == "first":
        hs, ht = hs[:, 0], ht[:, 0]
    per = (
        (hs - ht).pow(2).mean(-1)
        if kind == "mse"
        else 1 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
    )
    if mask is None or positions == "first":
        return per.mean()
    mask = mask.to(per.dtype)
    return (per * mask).sum() / mask.sum().clamp(min=1)
