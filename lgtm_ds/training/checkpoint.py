"""The run folder and its checkpoints: what may be written where (checked before anything is),
both engines' DeepSpeed checkpoints, the trainer's position and per-rank RNG.

A run folder (``output.dir``) holds one run: ``summary.json`` is written last and marks a
finished run (``"status": "failed"`` or ``"diverged"`` a failed one). :func:`check_run_folder`
refuses to start over a finished, failed or unfinished run unless ``output.overwrite`` /
``output.resume`` say so; :func:`resume_target` resolves ``output.resume``;
:func:`prepare_run_folder` (rank 0) clears what a fresh start replaces.

Layout under ``<output.dir>/checkpoints``: ``teacher/<tag>``, ``student/<tag>`` (DeepSpeed),
``<tag>/trainer_state.json`` (rank 0) and ``<tag>/rng_rank<r>.pt`` (every rank: dropout streams
differ per rank), ``<tag>/manifest.json`` (every file of the three parts, its size and CRC-32;
written last), and ``latest`` naming the newest complete checkpoint. Resuming verifies the
manifest before anything is loaded (:func:`verify_checkpoint`).

Atomic: every piece is written under ``<tag>.partial`` names; once all ranks are done (barrier),
rank 0 renames the three folders to ``<tag>`` and then replaces ``latest`` atomically. A kill at
any moment leaves ``latest`` naming a complete checkpoint (or absent), and at most some
``*.partial`` leftovers, which the next start removes (:func:`remove_partial`). Renames and
``latest`` are rank 0's, so ``output.dir`` must be one filesystem shared by all ranks (as
DeepSpeed's own ``latest`` file assumes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path

import torch

from ..engines.dist import barrier
from ..errors import ConfigError
from ..io import atomic_write_text, write_json_atomic
from .runlock import FILE as LOCK_FILE

PARTIAL = ".partial"
MANIFEST = "manifest.json"  # in <tag>/: every file of the checkpoint, its size and CRC-32
# what a run writes into output.dir (removed when resume=auto starts a run afresh)
RUN_OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "influence.jsonl",
    "generations",
    "config.yaml",
    "data_split.json",
    "student",
    "teacher",
    "summary.txt",
    "summary.json",
    "wandb",
    "wandb_run_id",
)
_TAG = re.compile(r"^(stage1_)?step(\d+)$")


def check_run_folder(out: Path, output) -> None:
    """ConfigError unless ``out`` may hold this run (``output``: the ``output`` section): a
    writable folder, and not a finished, failed or unfinished run unless ``overwrite`` /
    ``resume`` say what to do with it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir {str(out)!r} is a file, not a folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output.dir {str(out)!r}: cannot create or write it ({existing} is not a "
            f"writable folder)"
        )
    failed = failed_run(out)
    if failed and not output.overwrite and output.resume in (None, "auto"):
        raise ConfigError(
            f"output.dir {str(out)!r} holds a run that failed ({failed}); set "
            f"output.overwrite=true to start over, or output.resume=<a checkpoint folder "
            f"under {out / 'checkpoints'}> to continue from one with changed settings"
        )
    finished = finished_run(out)
    if finished and not (output.overwrite or output.resume):
        raise ConfigError(
            f"output.dir {str(out)!r} already holds a finished run (summary.json); "
            f"set output.overwrite=true or pick another folder"
        )
    started = any((out / f).exists() for f in ("metrics.jsonl", "checkpoints"))
    if started and not finished:
        if not (output.overwrite or output.resume):
            raise ConfigError(
                f"output.dir {str(out)!r} holds an unfinished run (metrics.jsonl or "
                f"checkpoints, no summary.json): set output.resume=auto to continue it, "
                f"output.overwrite=true to start over, or pick another folder"
            )


def finished_run(out: Path) -> bool:
    """``out`` holds a summary.json of a run that ended (completed or failed); an interrupted
    run's summary (SIGINT / SIGTERM) marks an unfinished run."""
    try:
        s = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return (out / "summary.json").exists()
    return not (isinstance(s, dict) and s.get("status") == "interrupted")


def failed_run(out: Path) -> str | None:
    """The failure reason if ``out`` holds a run whose summary says it failed (or diverged)."""
    try:
        s = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return (
        s.get("failure")
        if isinstance(s, dict) and s.get("status") in ("failed", "diverged")
        else None
    )


def resume_target(out: Path, output, announce: bool = True) -> tuple[Path, str] | None:
    """(checkpoints root, tag) to continue from, or None for a fresh start; a bad target
    fails here, before anything in the run folder is touched. ``announce``: print the
    checkpoints ``resume=auto`` skipped (rank 0)."""
    target = resolve_resume(output.resume, out, announce) if output.resume else None
    if output.resume and target is None and finished_run(out):
        raise ConfigError(
            f"output.resume=auto: {out} holds a finished run without checkpoints; "
            f"nothing to continue (output.overwrite=true starts it over)"
        )
    return target


def prepare_run_folder(out: Path, output, resuming: bool) -> None:
    """Rank 0, once everything is checked: a fresh start clears the folder (``overwrite``:
    all of it; ``resume=auto`` with nothing to resume: only what a run writes); leftovers of
    a save killed half-way go; a resumed run's old summary goes (it is written again last)."""
    if not resuming and out.exists():
        if output.overwrite:  # all of it but the lock file this run holds
            for path in out.iterdir():
                if path.name == LOCK_FILE:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        elif output.resume:  # resume=auto with nothing to resume yet: a fresh start
            for name in RUN_OUTPUTS:  # only what a run writes (the folder may hold more)
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    remove_partial(out / "checkpoints")
    (out / "summary.json").unlink(missing_ok=True)


def resolve_resume(resume: str, out: Path, announce: bool = True) -> tuple[Path, str] | None:
    """(checkpoints root, tag) of ``output.resume``: ``"auto"`` (the newest checkpoint under
    ``output.dir`` that verifies against its manifest, skipping damaged ones with a warning;
    None when there is none yet: the run starts fresh) or a checkpoint folder
    ``.../checkpoints/<tag>``, which must verify."""
    if resume == "auto":
        root = out / "checkpoints"
        tags = checkpoint_tags(root)
        if not tags:
            return None
        skipped = []
        for tag in reversed(tags):
            problems = verify_checkpoint(root, tag)
            if not problems:
                break
            skipped.append(f"{tag} ({'; '.join(problems)})")
        else:
            raise ConfigError(
                f"output.resume=auto: no checkpoint under {root} is complete: "
                + ", ".join(skipped)
                + "; output.overwrite=true starts the run over"
            )
        if skipped and announce:
            for what in skipped:
                print(f"warning: output.resume=auto: skipped damaged checkpoint {what}", flush=True)
            print(f"warning: output.resume=auto: resuming from {root / tag}", flush=True)
        return root, tag
    root, tag = Path(resume).parent, Path(resume).name
    if not (root / tag / "trainer_state.json").exists():
        raise ConfigError(
            f"output.resume: {root / tag} is not a checkpoint folder (no trainer_state.json)"
        )
    problems = verify_checkpoint(root, tag)
    if problems:
        raise ConfigError(
            f"output.resume: checkpoint {root / tag} is damaged: {'; '.join(problems)} "
            f"(output.resume=auto picks the newest complete one)"
        )
    return root, tag


# -- manifests --------------------------------------------------------------------------------
def _checkpoint_dirs(root: Path, tag: str, name: str | None = None) -> list[tuple[str, Path]]:
    """(the folder's path as the manifest names it, the folder on disk) of the three parts of
    checkpoint ``tag``; ``name``: the folders' name on disk (``<tag>.partial`` while saving)."""
    name = name or tag
    return [(f"{role}/{tag}", root / role / name) for role in ("teacher", "student")] + [
        (tag, root / name)
    ]


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_manifest(root: Path, tag: str, name: str) -> None:
    """Rank 0, once every rank's files are on disk: ``<name>/manifest.json`` listing every file
    of the checkpoint (paths relative to ``root`` under the final ``tag``), its size and the
    zlib CRC-32 of all its bytes. The last file written into a checkpoint."""
    files = {}
    for label, folder in _checkpoint_dirs(root, tag, name):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if label == tag and rel == MANIFEST:
                continue
            files[f"{label}/{rel}"] = {"size": path.stat().st_size, "crc32": _crc32(path)}
    write_json_atomic(root / name / MANIFEST, {"format": 1, "checksum": "crc32", "files": files})


def verify_checkpoint(root: Path, tag: str) -> list[str]:
    """What is wrong with checkpoint ``tag`` under ``root`` ([] = complete): files of its
    manifest missing, of another size or with other bytes. A checkpoint without a manifest
    (saved before 0.10) is checked for its three parts only."""
    try:
        manifest = json.loads((root / tag / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        missing = [label for label, folder in _checkpoint_dirs(root, tag) if not folder.is_dir()]
        if not (root / tag / "trainer_state.json").is_file():
            missing.append(f"{tag}/trainer_state.json")
        return [f"missing {', '.join(missing)}"] if missing else []
    except (OSError, ValueError, KeyError, TypeError):
        return [f"unreadable manifest {tag}/{MANIFEST}"]
    missing, changed = [], []
    for rel, want in files.items():
        path = root / rel
        if not path.is_file():
            missing.append(rel)
        elif path.stat().st_size != want["size"]:
            changed.append(f"{rel} ({path.stat().st_size} bytes, {want['size']} saved)")
        elif _crc32(path) != want["crc32"]:
            changed.append(f"{rel} (other bytes than saved: CRC-32 differs)")
    return ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"changed {', '.join(changed)}"] if changed else []
    )


def checkpoint_tags(root: Path) -> list[str]:
    """Every checkpoint tag under ``root`` (complete or not), oldest first (stage 1 before
    stage 2)."""
    tags = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _TAG.match(p.name)
        if m and p.is_dir():
            tags.append((m.group(1) is None, int(m.group(2)), p.name))
    return [t for *_, t in sorted(tags)]


def describe_tag(tag: str) -> str:
    """``step12`` -> "step 12", ``stage1_step4`` -> "teacher stage-1 step 4"."""
    m = _TAG.match(tag)
    if not m:
        return tag
    return ("teacher stage-1 step " if m.group(1) else "step ") + m.group(2)


def remove_partial(root: Path) -> list[Path]:
    """Delete the ``*.partial`` leftovers of an interrupted save (rank 0, at the start)."""
    gone = []
    for where in (root, root / "teacher", root / "student"):
        for p in sorted(where.glob(f"*{PARTIAL}")) if where.is_dir() else ():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def save_checkpoint(
    root: Path,
    tag: str,
    teacher,
    student,
    state: dict,
    *,
    rank: int,
    is_main: bool,
    keep: int | None = None,
) -> None:
    """Collective: every rank calls it. ``state`` is the trainer's (step, data positions, ...).
    ``keep``: how many complete checkpoints to keep (oldest removed first); None = all."""
    tmp = tag + PARTIAL
    teacher.save_checkpoint(str(root / "teacher"), tmp)
    student.save_checkpoint(str(root / "student"), tmp)
    (root / tmp).mkdir(parents=True, exist_ok=True)
    rng = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(rng, root / tmp / f"rng_rank{rank}.pt")
    if is_main:
        write_json_atomic(root / tmp / "trainer_state.json", state)
    barrier()  # every rank's shards and RNG are on disk
    if is_main:
        write_manifest(root, tag, tmp)  # last into the checkpoint: what "complete" means
        for where in (root / "teacher", root / "student", root):
            final = where / tag
            if final.exists():  # an older save of the same tag (a rerun over the folder)
                shutil.rmtree(final)
            (where / tmp).rename(final)
        atomic_write_text(root / "latest", tag)  # last: a checkpoint named here is complete
        if keep is not None:
            for old in complete_tags(root)[:-keep]:
                for where in (root / "teacher", root / "student", root):
                    shutil.rmtree(where / old, ignore_errors=True)
    barrier()


def complete_tags(root: Path) -> list[str]:
    """Complete checkpoint tags under ``root``, oldest first (stage 1 before stage 2)."""
    tags = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _TAG.match(p.name)
        if m and (p / "trainer_state.json").exists():
            tags.append((m.group(1) is None, int(m.group(2)), p.name))
    return [t for *_, t in sorted(tags)]


def load_checkpoint(root: Path, tag: str, teacher, student) -> dict:
    """Load both engines; returns the trainer state. Call :func:`restore_rng` after everything
    else that may draw random numbers."""
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
