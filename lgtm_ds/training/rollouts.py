"""On-policy samples on disk: ``generations/train_step<N>.jsonl``
(``method.generation.sample_every``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write_text


def write_generations(out: Path, step: int, sample: dict, tokenizer) -> Path:
    """One JSON line per row of ``sample`` (``{"by": "student" | "teacher", "rows": [{"prompt":
    ids, "completion": ids}]}``, from ``OnPolicy.prepare``): the step, who generated, the decoded
    prompt and completion (special tokens kept, so that EOS shows) and the completion's ids."""

    def text(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    lines = [
        json.dumps(
            {
                "step": step,
                "by": sample["by"],
                "prompt": text(r["prompt"]),
                "completion": text(r["completion"]),
                "completion_ids": r["completion"],
            }
        )
        for r in sample["rows"]
    ]
    path = Path(out) / "generations" / f"train_step{step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
