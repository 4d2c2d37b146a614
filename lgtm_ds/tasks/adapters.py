"""LoRA adapters (the ``peft`` library) on the teacher, the student or both:
``model.teacher_peft`` / ``model.student_peft`` (docs/adapters.md).

peft's ``get_peft_model`` / ``PeftModel.from_pretrained`` inject the adapters into the Hugging
Face model in place; the engines keep that model itself, not the ``PeftModel`` wrapper, so every
path that reads the model's own structure (the fused head, hidden states, ZeRO-3's hooks, the
student's functional influence passes) runs unchanged. What the adapters change is which
parameters are trainable: the LoRA matrices and the ``modules_to_save`` copies. The engines and
the optimizer enumerate ``requires_grad`` parameters only (``Engine.params``, ``build_adamw``),
so a frozen base weight is never copied, perturbed or given optimizer state. The wrapper rides
along on the model (not as a submodule: :func:`peft_wrapper`) for saving the adapter folder.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import Field
from torch import nn

from ..errors import ConfigError, ModelError
from ..options import NonEmptyStr, Options
from .hf import seeded

DEFAULT_R = 8
DEFAULT_DROPOUT = 0.0

# the attention and MLP projections, by Hugging Face ``config.model_type``
_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
}
# a sequence classifier's head, by the attribute names transformers gives it
_HEADS = ("classifier", "score")
_WRAPPER = "lgtm_peft_model"  # the PeftModel, in the model's __dict__ (not a submodule)


class AdapterOptions(Options):
    """One role's LoRA adapters (``model.teacher_peft`` / ``model.student_peft``)."""

    enabled: bool = Field(
        False,
        description="train LoRA adapters (the peft library, extra 'peft') instead of every "
        "weight: the base weights stay frozen, only the adapters and modules_to_save train",
    )
    r: int | None = Field(None, ge=1, description=f"LoRA rank; null = {DEFAULT_R}")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha (the update is scaled by alpha / r); null = 2 r"
    )
    dropout: float | None = Field(
        None, ge=0, lt=1, description=f"dropout on the adapters' input; null = {DEFAULT_DROPOUT}"
    )
    target_modules: list[NonEmptyStr] | None = Field(
        None,
        description="names (or dotted name endings) of the layers that get adapters; null = the "
        "attention and MLP projections of the architecture: Llama/Mistral/Qwen "
        + ",".join(_LLAMA)
        + "; GPT-2 c_attn,c_proj,c_fc; BERT query,key,value,dense",
    )
    modules_to_save: list[NonEmptyStr] | None = Field(
        None,
        description="modules trained in full beside the adapters; null = a sequence "
        "classifier's head (classifier / score), none for a causal LM; [] = none",
    )
    adapter: NonEmptyStr | None = Field(
        None,
        description="a saved PEFT adapter folder (adapter_config.json) to start from, trained "
        "further; its rank, alpha and targets are the folder's (leave r, alpha, dropout, "
        "target_modules, modules_to_save unset)",
    )

    def check(self, key: str) -> None:
        """The section's rules, naming ``key`` (``model.teacher_peft``)."""
        shape = ("r", "alpha", "dropout", "target_modules", "modules_to_save")
        given = [k for k in (*shape, "adapter") if getattr(self, k) is not None]
        if not self.enabled and given:
            raise ConfigError(f"{key}.{given[0]} is set but {key}.enabled is false")
        if self.adapter is not None:
            clash = [k for k in shape if getattr(self, k) is not None]
            if clash:
                raise ConfigError(
                    f"{key}.{clash[0]}: the adapter folder {key}.adapter sets it; leave it unset"
                )
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError(f"{key}.target_modules is empty: name the layers, or null")


def peft_wrapper(model: nn.Module):
    """The ``PeftModel`` whose adapters ``model`` carries, or None."""
    return model.__dict__.get(_WRAPPER)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """``(model parameters, trainable parameters)``. The first counts the model as it would
    be saved merged: with adapters, the LoRA matrices and peft's trained copies of
    ``modules_to_save`` (the original module is counted once) are left out; without, every
    parameter."""
    total = trainable = 0
    for name, p in model.named_parameters():
        trainable += p.numel() if p.requires_grad else 0
        if "lora_" in name or ".modules_to_save." in name:
            continue
        total += p.numel()
    return total, trainable


def apply_adapters(
    model: nn.Module, opts: AdapterOptions, *, key: str, name: str, seed: int = 0
) -> nn.Module:
    """``model`` with LoRA adapters injected in place per ``opts`` (the same object; untouched
    when the section is off). ``key``: the section's dotted name for errors; ``name``: the
    configured model (``model.teacher``), recorded as the adapter's base model; ``seed``: the
    new adapters' initialisation (A random, B zero), the same on every rank, the global RNG
    left as it was."""
    if not opts.enabled:
        return model
    opts.check(key)
    peft = _import_peft(key)
    if opts.adapter is not None:
        path = os.path.expanduser(opts.adapter)
        saved = read_adapter_config(path, f"{key}.adapter")
        _check_base(saved, name, path, key)
        targets = saved.get("target_modules")
        if isinstance(targets, list):  # (a regex string is peft's to match)
            check_targets(model, targets, f"{key}.adapter ({path}) target_modules", name)
            _not_the_output_layer(model, targets, f"{key}.adapter ({path}) target_modules")
        try:
            wrapper = peft.PeftModel.from_pretrained(model, path, is_trainable=True)
        except Exception as e:  # noqa: BLE001  (shapes that do not fit, a corrupt file)
            raise ModelError(f"{key}.adapter: cannot load {path!r} into {name!r}: {e}") from e
    else:
        targets = opts.target_modules or default_targets(model, key)
        check_targets(model, targets, f"{key}.target_modules", name)
        _not_the_output_layer(model, targets, f"{key}.target_modules")
        save = opts.modules_to_save
        if save is None:
            save = default_modules_to_save(model)
        else:
            check_targets(model, save, f"{key}.modules_to_save", name, any_type=True)
            _not_the_output_layer(model, save, f"{key}.modules_to_save")
        r = opts.r or DEFAULT_R
        config = peft.LoraConfig(
            r=r,
            lora_alpha=opts.alpha if opts.alpha is not None else 2 * r,
            lora_dropout=opts.dropout if opts.dropout is not None else DEFAULT_DROPOUT,
            target_modules=list(targets),
            modules_to_save=list(save) or None,
            fan_in_fan_out=_conv1d_targets(model, targets),
            bias="none",
        )
        with seeded(seed):
            wrapper = peft.get_peft_model(model, config)
    # the configured name, so that a saved adapter says which model it belongs to
    wrapper.peft_config["default"].base_model_name_or_path = name
    model.__dict__[_WRAPPER] = wrapper
    return model


def _import_peft(key: str):
    try:
        import peft
    except ImportError as e:
        raise ConfigError(
            f"{key}.enabled needs the peft library: pip install 'lgtm-ds[peft]'"
        ) from e
    return peft


def default_targets(model: nn.Module, key: str) -> list[str]:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in DEFAULT_TARGETS:
        raise ConfigError(
            f"{key}.target_modules: no default for model type {kind!r} (defaults exist for "
            f"{', '.join(sorted(DEFAULT_TARGETS))}); name its layers, e.g. [q_proj, v_proj]"
        )
    return DEFAULT_TARGETS[kind]


def default_modules_to_save(model: nn.Module) -> list[str]:
    """A sequence classifier's head (trained in full), nothing for other models."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return []
    return [h for h in _HEADS if isinstance(getattr(model, h, None), nn.Module)]


def _matches(model: nn.Module, target: str) -> list[tuple[str, nn.Module]]:
    return [
        (n, m) for n, m in model.named_modules() if n and (n == target or n.endswith("." + target))
    ]


def _adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, nn.Linear | nn.Embedding | nn.Conv1d | nn.Conv2d | Conv1D)


def check_targets(
    model: nn.Module, targets: list[str], key: str, name: str, any_type: bool = False
) -> None:
    """Every name in ``targets`` is the name (or dotted name ending) of a module of ``model``
    that LoRA can adapt (``any_type``: of any module); else one ModelError naming ``key``."""
    for t in targets:
        found = _matches(model, t)
        if not found:
            layers = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _adaptable(m)}
            )
            raise ModelError(
                f"{key}: {t!r} names no module of {name!r} ({type(model).__name__}); its "
                f"adaptable layers are named {', '.join(layers)}"
            )
        if not any_type and not any(_adaptable(m) for _, m in found):
            raise ModelError(
                f"{key}: {t!r} in {name!r} is a {type(found[0][1]).__name__}; LoRA adapts linear, "
                "embedding and convolution layers"
            )


def _not_the_output_layer(model: nn.Module, targets: list[str], key: str) -> None:
    """A causal LM's output layer stays as it is: the fused head and the teacher's logit
    gradient read its weight directly, which a LoRA or modules_to_save wrapper would bypass."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return
    get = getattr(model, "get_output_embeddings", None)
    out = get() if get is not None else None
    if out is None:
        return
    for t in targets:
        for n, m in _matches(model, t):
            if m is out:
                raise ModelError(
                    f"{key}: {t!r} is the output layer ({n}); adapters or modules_to_save there "
                    "are not supported (the fused head reads its weight directly): leave it out"
                )


def _conv1d_targets(model: nn.Module, targets: list[str]) -> bool:
    """GPT-2's ``Conv1D`` stores its weight transposed (peft's ``fan_in_fan_out``)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for t in targets for _, m in _matches(model, t))


def read_adapter_config(path: str, key: str) -> dict[str, Any]:
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"{key}: {file} does not exist (a PEFT adapter folder holds it)")
    with open(file) as f:
        saved = json.load(f)
    if saved.get("peft_type") != "LORA":
        raise ConfigError(f"{key}: {file} is a {saved.get('peft_type')} adapter, not LoRA")
    return saved


def _check_base(saved: dict, name: str, path: str, key: str) -> None:
    """The adapter was trained on the configured model: the same name (the last path part,
    so a hub id and a local copy of it agree)."""
    base = saved.get("base_model_name_or_path")
    if not base:
        return

    def short(s: str) -> str:
        return os.path.basename(os.path.normpath(os.path.expanduser(s))).lower()

    if short(base) != short(name):
        raise ModelError(
            f"{key}.adapter: {path} was trained on {base!r}, but the model is {name!r}: "
            "adapters only fit the model they were trained on"
        )


# -- saving ----------------------------------------------------------------------------------------

ADAPTER_DIR = "adapter"  # with output.merge_adapters: the adapter folder inside the merged model's


def save_adapter(model: nn.Module, path: str, state: dict | None = None) -> None:
    """The adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA
    matrices and the ``modules_to_save`` copies) of ``model``; ``state``: its full state dict
    where the module's own cannot be read (gathered ZeRO-3 parameters)."""
    wrapper = peft_wrapper(model)
    if state is not None:  # the PeftModel's keys: the model's behind its prefix
        state = {f"base_model.model.{k}": v for k, v in state.items()}
    wrapper.save_pretrained(path, state_dict=state)


_DROP = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".original_module.")


def merged_state_dict(model: nn.Module, state: dict, deltas: dict | None = None) -> dict:
    """``state`` (``model``'s full state dict, CPU tensors) as the plain model's: each adapted
    weight ``W + (alpha / r) B A``, each ``modules_to_save`` copy in its module's place, the
    adapter tensors dropped. ``deltas``: the ``(alpha / r) B A`` per adapted weight's name
    (``{}``: ``state`` holds the merged weights already, as ZeRO-3's layer-by-layer save makes
    it); None = read them from ``model``."""
    from peft.tuners.lora import LoraLayer

    if deltas is None:
        deltas = {}
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
                delta = mod.get_delta_weight("default").detach().cpu()
                deltas[f"{name}.base_layer.weight"] = delta
    out = {}
    for k, v in state.items():
        if any(d in k for d in _DROP):
            continue
        if k in deltas:
            v = v + deltas[k].to(v.dtype)
        out[k.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = v
    return out
