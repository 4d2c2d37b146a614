"""Build teacher and student models: Hugging Face names/paths, or small embedded BERTs."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

from .errors import ModelError

# Small BERT-style models for the embedded default experiment (no download). Sizes chosen so the
# default run trains in well under 3 minutes on 2 CPU cores.
EMBEDDED = {
    "teacher": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512
    ),
    "student": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256
    ),
    # for unit tests
    "tiny": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
}


def embedded_config(
    name: str,
    *,
    vocab_size: int,
    num_labels: int,
    max_position: int = 512,
    dropout: float | None = None,
) -> BertConfig:
    if name not in EMBEDDED:
        raise ModelError(
            f"unknown embedded model 'embedded:{name}'; known: "
            f"{', '.join('embedded:' + k for k in EMBEDDED)}"
        )
    cfg = BertConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position,
        num_labels=num_labels,
        **EMBEDDED[name],
    )
    if dropout is not None:
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
    return cfg


def build_model(
    name_or_path: str,
    *,
    num_labels: int,
    vocab_size: int | None = None,
    dropout: float | None = None,
    zero_init_classifier: bool = True,
    role: str = "model",
    is_regression: bool = False,
) -> torch.nn.Module:
    """An ``AutoModelForSequenceClassification`` from a hub name / local path / ``embedded:*``."""
    if name_or_path.startswith("embedded:"):
        if vocab_size is None:
            raise ModelError(f"{role}: an embedded model needs the tokenizer's vocab size")
        cfg = embedded_config(
            name_or_path.split(":", 1)[1],
            vocab_size=vocab_size,
            num_labels=num_labels,
            dropout=dropout,
        )
        if is_regression:
            cfg.problem_type = "regression"
        torch.manual_seed(0)  # note: embedded weights are a function of the config only
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        try:
            cfg = AutoConfig.from_pretrained(name_or_path)
        except Exception as e:  # hub unreachable, bad path, ...
            raise ModelError(f"{role}: cannot load config of {name_or_path!r}: {e}") from e
        has_head = any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or []))
        if has_head and cfg.num_labels != num_labels:
            raise ModelError(
                f"{role} {name_or_path!r} was trained with a {cfg.num_labels}-label "
                f"classification head but the task has {num_labels} labels"
            )
        cfg.num_labels = num_labels
        if dropout is not None:
            for key in (
                "hidden_dropout_prob",
                "attention_probs_dropout_prob",
                "dropout",
                "attention_dropout",
                "classifier_dropout",
            ):
                if getattr(cfg, key, None) is not None:
                    setattr(cfg, key, dropout)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, config=cfg)
        except Exception as e:
            raise ModelError(f"{role}: cannot load model {name_or_path!r}: {e}") from e
    if model.config.num_labels != num_labels:
        raise ModelError(
            f"{role} {name_or_path!r} has {model.config.num_labels} labels, the task "
            f"has {num_labels}"
        )
    if zero_init_classifier:
        zero_classifier_(model)
    return model


def classifier_head(model: torch.nn.Module) -> torch.nn.Module | None:
    for attr in ("classifier", "score", "classification_head"):
        head = getattr(model, attr, None)
        if head is not None:
            return head
    return None


@torch.no_grad()
def zero_classifier_(model: torch.nn.Module) -> None:
    """The LGTM reference initialises both classification heads to zero."""
    head = classifier_head(model)
    if head is None:
        return
    # Only the final projection: zeroing a hidden dense layer too would kill its gradient.
    last = None
    for m in head.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    if last is not None:
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()


def check_pair(
    teacher: torch.nn.Module, student: torch.nn.Module, t_name: str, s_name: str
) -> None:
    nt, ns = teacher.config.num_labels, student.config.num_labels
    if nt != ns:
        raise ModelError(
            f"teacher {t_name!r} predicts {nt} labels but student {s_name!r} "
            f"predicts {ns}: distillation needs the same label set"
        )
