"""The training run: the trainer loop, checkpoints, metrics logging (jsonl, wandb), summary."""

from .trainer import Trainer, run

__all__ = ["Trainer", "run"]
