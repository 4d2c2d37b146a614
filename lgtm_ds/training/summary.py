"""The run summary: ``summary.json`` (written last: marks a finished run) and a one-screen text."""

from __future__ import annotations

from pathlib import Path


def build_summary(
    cfg,
    *,
    task_name: str,
    primary: str,
    lower_is_better: bool = False,
    data: dict | None = None,
    steps: int,
    stage1_steps: int,
    world: int,
    wall_s: float,
    params: dict,
    zero_stage: dict,
    frozen: list[str] | None = None,
    trainable_params: dict | None = None,
    final: dict,
    history: list[dict],
    resumed_from: list[str] | None = None,
    skipped_steps: int = 0,
    failure: str | None = None,
    peak_memory: dict | None = None,
    fused_head: dict | None = None,
    status: str | None = None,
) -> dict:
    return {
        # completed / failed / diverged (the loss-spike guard) / interrupted (SIGINT or
        # SIGTERM; "interrupted" says where)
        "status": status or ("failed" if failure else "completed"),
        "failure": failure,
        "method": cfg.method.name,
        "task": task_name,
        "steps": steps,
        "stage1_steps": stage1_steps,
        "world_size": world,
        "wall_s": round(wall_s, 2),
        "params": params,  # the models as saved merged (no LoRA matrices)
        "trainable_params": trainable_params or params,
        "zero_stage": zero_stage,
        # roles built without an optimizer (they never step; ZeRO-1/2 become 0 for them)
        "frozen": list(frozen or []),
        "fused_head": fused_head or {"teacher": False, "student": False},
        "precision": cfg.train.precision,
        "primary_metric": primary,
        "lower_is_better": lower_is_better,
        "final": {k: v for k, v in final.items() if k != "step"},
        "best_student": (min if lower_is_better else max)(
            (h[f"student/{primary}"] for h in history if h["step"] > 0), default=None
        ),
        "initial": next(
            ({k: v for k, v in h.items() if k != "step"} for h in history if h["step"] == 0), None
        ),
        "evaluations": history,
        "resumed_from": list(resumed_from or []),  # checkpoints the run continued from
        # steps the engines skipped (non-finite gradient / loss / influence, fp16 overflow)
        "skipped_steps": skipped_steps,
        # max over ranks: CUDA max allocated (kind "cuda") or the process's peak RSS ("cpu")
        "peak_memory": peak_memory,
        "dropped_by_truncation": (data or {}).get("dropped_by_truncation"),
    }


def _params(s: dict, role: str) -> str:
    """``"22.71M params"``, with the trainable share where it is not all (adapters)."""
    total, trainable = s["params"][role], s.get("trainable_params", s["params"])[role]
    text = f"{total / 1e6:.2f}M params"
    # all trainable, or none (a frozen role: its engine text says so)
    return text if trainable in (total, 0) else f"{text}, {trainable / 1e6:.2f}M trainable"


def _engine(s: dict, role: str) -> str:
    """``"ZeRO-2"``, or ``"frozen, ZeRO-0"`` for a role without an optimizer."""
    stage = f"ZeRO-{s['zero_stage'][role]}"
    return f"frozen, {stage}" if role in s.get("frozen", ()) else stage


def format_summary(s: dict, out: Path) -> str:
    pm = s["primary_metric"]
    lines = [
        "=" * 64,
        f"LGTM-DS run: {s['method']} on {s['task']} ({s['steps']} steps"
        + (f" + {s['stage1_steps']} teacher stage-1 steps" if s["stage1_steps"] else "")
        + f", {s['world_size']} rank(s), {s['precision']})",
        f"teacher {_params(s, 'teacher')} ({_engine(s, 'teacher')})"
        f"  ->  student {_params(s, 'student')} ({_engine(s, 'student')})",
        f"wall time {s['wall_s']:.1f} s"
        + (f" (resumed {len(s['resumed_from'])}x)" if s.get("resumed_from") else ""),
        (
            "before training: "
            + ", ".join(f"{k} {_num(v)}" for k, v in sorted(s["initial"].items()))
            if s.get("initial")
            else ""
        ),
        f"FAILED: {s['failure']}" if s.get("failure") else "",
        f"INTERRUPTED: {s['interrupted']['message']}" if s.get("interrupted") else "",
        f"  ({s['advice']})" if s.get("advice") else "",
        (
            "final eval: " + ", ".join(f"{k} {_num(v)}" for k, v in sorted(s["final"].items()))
            if s["final"]
            else ""
        ),
        f"skipped steps: {s['skipped_steps']}" if s.get("skipped_steps") else "",
        (
            f"dropped (all loss tokens truncated away): {s['dropped_by_truncation']}"
            if any((s.get("dropped_by_truncation") or {}).values())
            else ""
        ),
        f"best student {pm}: {s['best_student']:.4f}" if s["best_student"] is not None else "",
        (
            "test (final models): "
            + ", ".join(f"{k} {_num(v)}" for k, v in sorted(s["test"].items()))
            if s.get("test")
            else ""
        ),
        f"outputs: {out}/ (config.yaml, metrics.jsonl, data_split.json, "
        + ("influence.jsonl, " if (out / "influence.jsonl").exists() else "")
        + ("generations/, " if (out / "generations").exists() else "")
        + ("student/, " if s["status"] == "completed" else "")
        + ("teacher/, " if (out / "teacher").exists() and s["status"] == "completed" else "")
        + "summary.txt, summary.json)",
        "=" * 64,
    ]
    return "\n".join(line for line in lines if line)


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) else str(v)
