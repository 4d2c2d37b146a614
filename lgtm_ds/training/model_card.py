"""``README.md`` (a Hugging Face model card) in each saved model folder: what the model is, how it
was distilled, on what data, and how it scored: written from the run's config and summary."""

from __future__ import annotations

import yaml

from .. import __version__
from ..tasks.adapters import DEFAULT_R


def model_card(role: str, cfg, summary: dict, split: dict) -> str:
    """The model card of the saved ``role`` ("student" or "teacher") of a finished run."""
    m, method, train = cfg.model, cfg.method, cfg.train
    pm = summary["primary_metric"]
    student = m.student
    if student == "from_teacher":
        how = (
            f"layers {m.student_layers}"
            if m.student_layers is not None
            else f"every {m.student_layer_stride}-th layer"
            if m.student_layer_stride
            else f"random init, config {m.student_config}"
        )
        student = f"made from {m.teacher} ({how})"
    own, other = (student, m.teacher) if role == "student" else (m.teacher, student)
    meta = {
        "library_name": "transformers",
        "tags": ["knowledge-distillation", "lgtm-ds", f"lgtm-ds-{method.name}"],
    }
    if not own.startswith("embedded:") and "/" in own and not own.startswith((".", "/", "~")):
        meta["base_model"] = own  # a hub id (a local path would not resolve for readers)
    peft = getattr(m, f"{role}_peft")
    if peft.enabled and not cfg.output.merge_adapters:
        meta["library_name"] = "peft"
    if cfg.data.source == "hub" and cfg.data.dataset:
        meta["datasets"] = [cfg.data.dataset]
    # the objectives' weights every method shares, then the running method's own options
    shared = ("alpha_student", "alpha_teacher", "temperature", "scale_by_t2", "jsd_beta")
    hp = {k: getattr(method, k) for k in (*shared, "teacher_jsd_beta")}
    options = getattr(method, method.name, None)
    if options is not None:
        hp.update(options.model_dump())
    final = summary.get("final") or {}
    initial = summary.get("initial") or {}
    rows = [
        f"| {key} | {_num(initial.get(key))} | {_num(final.get(key))} |"
        for key in sorted(set(final) | set(initial))
    ]
    data = (
        f"`data.source: {cfg.data.source}`"
        + (f", task `{cfg.data.task}`" if cfg.data.task else "")
        + (f", `{cfg.data.dataset}`" if cfg.data.dataset else "")
    )
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {role} distilled with LGTM-DS ({method.name})",
        "",
        f"The **{role}** of a joint teacher-student distillation run: {role} `{own}` "
        f"({_param_text(summary, role)}), "
        f"{'teacher' if role == 'student' else 'student'} `{other}`, method `{method.name}`, "
        f"task type `{split.get('task_type')}`, trained with LGTM-DS {__version__}.",
        "",
        *_adapter_lines(peft, own, cfg.output.merge_adapters),
        "## Training",
        "",
        f"- data: {data}; {split.get('n_train')} training / {split.get('n_quiz')} quiz "
        f"(`{split.get('quiz_source')}`) / {split.get('n_eval')} evaluation examples",
        f"- {summary['steps']} optimizer steps"
        + (
            f" after {summary['stage1_steps']} teacher stage-1 steps"
            if summary["stage1_steps"]
            else ""
        )
        + f", {summary['world_size']} rank(s), {summary['precision']}, ZeRO "
        f"{summary['zero_stage']['teacher']} (teacher) / {summary['zero_stage']['student']} "
        f"(student); micro-batch {train.micro_batch_size} x accumulation "
        f"{train.gradient_accumulation_steps} per rank",
        f"- learning rates: student {train.student_lr}, teacher {train.teacher_lr}; warmup "
        f"{train.warmup_ratio}, weight decay {train.weight_decay}, seed {train.seed}",
        "- method hyper-parameters: " + ", ".join(f"`{k}: {v}`" for k, v in hp.items()),
        "",
        "## Evaluation",
        "",
        f"On the evaluation split ({split.get('n_eval')} examples); primary metric `{pm}` "
        f"({'lower' if summary.get('lower_is_better') else 'higher'} is better); best student "
        f"{pm} over the run's evaluations: {_num(summary.get('best_student'))}.",
        "",
        "| metric | before training | final |",
        "|---|---|---|",
        *rows,
        "",
        "The run folder holds the resolved config (`config.yaml`), `metrics.jsonl`, "
        "`data_split.json` (the seeded split indices) and `summary.json`.",
    ]
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) else "-"


def _adapter_lines(peft, base: str, merged: bool) -> list[str]:
    """What the folder holds when the role trained LoRA adapters (``model.<role>_peft``)."""
    if not peft.enabled:
        return []
    r = peft.r or DEFAULT_R
    alpha = peft.alpha if peft.alpha is not None else 2 * r
    how = f"from `{peft.adapter}`" if peft.adapter else f"rank {r}, alpha {alpha:g}"
    if merged:
        return [
            f"Trained as LoRA adapters on a frozen `{base}` ({how}); this folder holds the "
            "**merged** model (base + adapters), which loads with plain transformers; the "
            "adapter folder itself is in `adapter/`.",
            "",
        ]
    return [
        f"Trained as LoRA adapters on a frozen `{base}` ({how}); this folder holds the "
        "**adapter** only (`adapter_config.json`, `adapter_model.safetensors`): load the base "
        "model, then `peft.PeftModel.from_pretrained(base, folder)`; "
        "`output.merge_adapters: true` saves the merged model instead.",
        "",
    ]


def _param_text(summary: dict, role: str) -> str:
    total = summary["params"][role]
    trainable = summary.get("trainable_params", summary["params"])[role]
    text = f"{total / 1e6:.2f}M parameters"
    return text if trainable in (total, 0) else f"{text}; {trainable / 1e6:.2f}M trainable"
