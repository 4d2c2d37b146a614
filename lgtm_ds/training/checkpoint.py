"""Checkpoints: both engines' DeepSpeed checkpoints, the trainer's position and per-rank RNG.

Layout under ``<output.dir>/checkpoints``: ``teacher/<tag>``, ``student/<tag>`` (DeepSpeed),
``<tag>/trainer_state.json`` (rank 0) and ``<tag>/rng_rank<r>.pt`` (every rank: dropout streams
differ per rank), and ``latest``, written last, naming the newest complete checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..engines.deepspeed import barrier
from ..errors import ConfigError
from ..io import write_json_atomic


def resolve_resume(resume: str, out: Path) -> tuple[Path, str]:
    """(checkpoints root, tag) of ``output.resume``: ``"auto"`` (the latest under
    ``output.dir``) or a checkpoint folder ``.../checkpoints/<tag>``."""
    if resume == "auto":
        root = out / "checkpoints"
        if not (root / "latest").exists():
            raise ConfigError(f"output.resume=auto: no finished checkpoint under {root}")
        tag = (root / "latest").read_text().strip()
    else:
        root, tag = Path(resume).parent, Path(resume).name
    if not (root / tag / "trainer_state.json").exists():
        raise ConfigError(
            f"output.resume: {root / tag} is not a checkpoint folder (no trainer_state.json)"
        )
    return root, tag


def save_checkpoint(
    root: Path, tag: str, teacher, student, state: dict, *, rank: int, is_main: bool
) -> None:
    """Collective: every rank calls it. ``state`` is the trainer's (step, data positions)."""
    teacher.save_checkpoint(str(root / "teacher"), tag)
    student.save_checkpoint(str(root / "student"), tag)
    (root / tag).mkdir(parents=True, exist_ok=True)
    rng = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(rng, root / tag / f"rng_rank{rank}.pt")
    if is_main:
        write_json_atomic(root / tag / "trainer_state.json", state)
    barrier()
    if is_main:
        (root / "latest").write_text(tag)  # last: a checkpoint named here is complete


def load_checkpoint(root: Path, tag: str, teacher, student) -> dict:
    """Load both engines; returns the trainer state. Call :func:`restore_rng` after everything
    else that may draw random numbers (creating a DataLoader iterator does)."""
    teacher.load_checkpoint(str(root / "teacher"), tag)
    student.load_checkpoint(str(root / "student"), tag)
    return json.loads((root / tag / "trainer_state.json").read_text())


def restore_rng(root: Path, tag: str, *, rank: int) -> None:
    rng_file = root / tag / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
