"""Tiny models and random batches shared by the algorithm tests."""

import torch
from transformers import AutoModelForSequenceClassification

from lgtm_ds.models import embedded_config

VOCAB, LABELS = 61, 3


def tiny_model(dtype=torch.float32, seed=0, size="tiny"):
    torch.manual_seed(seed)
    cfg = embedded_config(size, vocab_size=VOCAB, num_labels=LABELS, dropout=0.0)
    m = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    # fresh, non-zero classifier: a zero head makes several gradients vanish (tests need no zeros)
    torch.nn.init.normal_(m.classifier.weight, std=0.3)
    torch.nn.init.normal_(m.classifier.bias, std=0.1)
    return m.to(dtype)


def random_batch(n, seed, length=11):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, length - 3 :] = 0  # some padding
    return {
        "input_ids": torch.randint(5, VOCAB, (n, length), generator=g),
        "attention_mask": mask,
        "labels": torch.randint(0, LABELS, (n,), generator=g),
    }


def free_port() -> int:
    """A TCP port nobody listens on now (rendezvous of launched ranks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
