"""The layout's rules, checked: what each package may import, launch/ holds no logic, and a new
method or task type is one class in one file (the trainer and the Distiller take it unchanged).

The runs (trainer, ranks, processes); the in-process tests:
``tests/unit/test_architecture.py``."""

import copy
import json

import pytest
import torch
from pydantic import Field

from lgtm_ds import ConfigError, Distiller
from lgtm_ds.config import ExperimentConfig, load_config
from lgtm_ds.engines.optim import build_adamw
from lgtm_ds.methods import METHODS, Method
from lgtm_ds.methods.naive import naive_lgtm_step
from lgtm_ds.options import Options
from lgtm_ds.tasks import TASKS, Task, hf
from lgtm_ds.tasks.base import SOURCE_INDEX, ModelOptions
from lgtm_ds.tasks.classification import divergence_f64

from ..helpers import make_distiller, random_batch, tiny_model


class FrozenTeacherOptions(Options):
    """frozen_teacher_kd only: a plug-in's own options."""

    note: str = Field("frozen", description="free text, reported by the step")


class FrozenTeacherKD(Method):
    """A method as a user would add one: the teacher never learns and has no first stage; its
    options are the section method.frozen_teacher_kd, as soon as it is registered."""

    name = "frozen_teacher_kd"
    summary = "teacher frozen from the start; student on L_s"
    trains_teacher = False
    Options = FrozenTeacherOptions

    def teacher_update(self, micro, quiz):
        return {"note": self.options.note}


@pytest.fixture
def frozen_method():
    METHODS.register(FrozenTeacherKD)
    yield FrozenTeacherKD
    METHODS.unregister(FrozenTeacherKD.name)
    assert (
        "frozen_teacher_kd" not in ExperimentConfig.model_fields["method"].annotation.model_fields
    )


def test_a_new_method_is_one_class(frozen_method, tmp_path, dist_env):
    """Registered from outside the package, it is accepted by the config and the Distiller and
    runs through the trainer unchanged (no name branches anywhere)."""
    from lgtm_ds.training import run

    t, s = tiny_model(seed=1), tiny_model(seed=2)
    t0 = [p.detach().clone() for p in t.parameters()]
    d = make_distiller("frozen_teacher_kd", t, s)
    m = d.step(random_batch(8, 1))
    assert m["student_loss"] > 0 and all(torch.equal(p, q) for p, q in zip(t.parameters(), t0))
    assert m["note"] == "frozen"  # its option's default
    cfg = load_config(
        None,
        [
            "method.name=frozen_teacher_kd",
            "method.frozen_teacher_kd.note=from the config",
            f"output.dir={tmp_path / 'out'}",
            "data.synthetic_examples=200",
            "train.micro_batch_size=8",
            "train.max_steps=2",
            "train.eval_every=0",
        ],
    )
    assert (
        Distiller(config=cfg.method, teacher=t, student=s).method.options.note == "from the config"
    )
    summary = run(cfg)
    assert summary["method"] == "frozen_teacher_kd" and summary["steps"] == 2
    assert summary["stage1_steps"] == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all("teacher_lr" not in r for r in rows)  # the trainer asked trains_teacher


class MultipleChoice(Task):
    """A task type built from ``Task`` alone, as a user would add one: multiple choice. Each
    example is its text paired with every label name; the model scores the pairs
    (``AutoModelForMultipleChoice``, logits [B, choices]) and the answer is the right pair. The
    LGTM teacher gradient and influence come from ``Task``'s generic form (autograd on the
    logits); the data is any labelled source's."""

    name = "multiple_choice"
    summary = "text + each label name as a choice; KL over choices + CE; accuracy"
    default_metrics = ("accuracy",)

    def encode(self, ds, tokenizer, *, text_columns, max_length):
        names = self.label_names or [str(i) for i in range(self.num_labels)]

        def fn(batch):
            out = {"input_ids": [], "attention_mask": [], "labels": batch["label"]}
            for text in batch[text_columns[0]]:
                enc = tokenizer([text] * len(names), names, truncation=True, max_length=max_length)
                out["input_ids"].append(enc["input_ids"])
                out["attention_mask"].append(enc["attention_mask"])
            if SOURCE_INDEX in batch:
                out[SOURCE_INDEX] = batch[SOURCE_INDEX]
            return out

        return ds.map(fn, batched=True, remove_columns=ds.column_names, keep_in_memory=True)

    def collator(self, tokenizer, pad_to_multiple_of=None):
        def collate(rows):
            length = max(len(c) for r in rows for c in r["input_ids"])
            pad = [
                [c + [tokenizer.pad_token_id] * (length - len(c)) for c in r["input_ids"]]
                for r in rows
            ]
            mask = [[c + [0] * (length - len(c)) for c in r["attention_mask"]] for r in rows]
            out = {"input_ids": torch.tensor(pad), "attention_mask": torch.tensor(mask)}
            out["labels"] = torch.tensor([r["labels"] for r in rows])
            if SOURCE_INDEX in rows[0]:
                out[SOURCE_INDEX] = torch.tensor([r[SOURCE_INDEX] for r in rows])
            return out

        return collate

    def build_model(self, name_or_path, *, role, options):
        from transformers import AutoModelForMultipleChoice

        size = name_or_path.removeprefix(hf.EMBEDDED_PREFIX)
        o = options
        cfg = hf.embedded_bert_config(
            size, vocab_size=o.vocab_size, num_labels=1, dropout=o.dropout
        )
        with hf.seeded(hf.init_seed(options.seed, role)):
            return AutoModelForMultipleChoice.from_config(cfg)

    def kd_per_row(self, logits, target_logits, temperature, beta=0.0, differentiable=False):
        target = target_logits if differentiable else target_logits.detach()
        return divergence_f64(logits, target.to(logits.dtype), temperature, beta)

    def task_loss(self, logits, labels):
        return torch.nn.functional.cross_entropy(logits.float(), labels)


@pytest.fixture
def choice_task():
    TASKS.register(MultipleChoice)
    yield MultipleChoice
    TASKS.unregister(MultipleChoice.name)


def _choice_batch(n, seed, choices=3, length=9):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, 40, (n, choices, length), generator=g),
        "attention_mask": torch.ones(n, choices, length, dtype=torch.long),
        "labels": torch.randint(0, choices, (n,), generator=g),
    }


def test_a_task_type_built_from_task_runs_through_config_distiller_and_trainer(
    choice_task, tmp_path, dist_env
):
    """Not a ClassificationTask: the sources, the schema, the Distiller and the trainer ask
    the task object (what it reads, its labels, its losses), never its name. The cheap LGTM
    step on it equals the reference form (float64)."""
    from lgtm_ds.training import run

    task = MultipleChoice(num_labels=3)
    opts = ModelOptions(vocab_size=40, dropout=0.0, seed=3)
    t, s = (
        task.build_model("embedded:tiny", role=r, options=opts).double()
        for r in ("teacher", "student")
    )
    t2, s2 = copy.deepcopy((t, s))
    b, q = _choice_batch(6, 1), _choice_batch(5, 2)
    to, seen = build_adamw(t, 1e-3, 0.0), {}
    step = to.step

    def capture(*a, **k):  # the teacher gradient G as the optimizer receives it
        seen["G"] = [p.grad.detach().clone() for p in t.parameters()]
        return step(*a, **k)

    to.step = capture
    kw = dict(task=task, teacher_optimizer=to, student_optimizer=build_adamw(s, 1e-3, 0.0))
    m = Distiller("lgtm", teacher=t, student=s, **kw).step(b, q)
    assert m["influence"].shape == (6,) and torch.isfinite(m["influence"]).all()
    opt2 = build_adamw(t2, 1e-3, 0.0), build_adamw(s2, 1e-3, 0.0)
    ref = naive_lgtm_step(t2, s2, *opt2, b, q, task=task)
    rel = lambda a, b: float(  # noqa: E731
        torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)))
        / torch.sqrt(sum((y**2).sum() for y in b))
    )
    # the reference's three-backward difference cancels digits (docs/algorithm.md, Numerics)
    assert rel(seen["G"], ref["G"]) < 1e-6
    assert rel([m["influence"]], [ref["influence"]]) < 1e-6
    cfg = load_config(
        None,
        [
            "data.task_type=multiple_choice",
            f"output.dir={tmp_path / 'out'}",
            "data.synthetic_examples=200",
            "train.micro_batch_size=8",
            "train.max_steps=2",
            "train.eval_every=0",
        ],
    )
    summary = run(cfg)
    assert summary["steps"] == 2 and "student/accuracy" in summary["final"]
    split = json.loads((tmp_path / "out" / "data_split.json").read_text())
    assert split["task_type"] == "multiple_choice"
    with pytest.raises(ConfigError, match="data.format='text' applies to task types that read"):
        load_config(None, ["data.task_type=multiple_choice", "data.format=text"])
