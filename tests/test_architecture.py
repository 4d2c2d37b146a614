"""The layout's rules, checked: what each package may import, launch/ holds no logic, and a new
method or task type is one class in one file (the trainer and the Distiller take it unchanged)."""

import ast
import copy
import inspect
import json
from pathlib import Path

import pytest
import torch
from pydantic import Field

from lgtm_ds import ConfigError, Distiller
from lgtm_ds.config import ExperimentConfig, load_config
from lgtm_ds.engines.optim import build_adamw
from lgtm_ds.methods import METHODS, Method, get_method, method_config, method_names
from lgtm_ds.methods.naive import naive_lgtm_step
from lgtm_ds.options import Options
from lgtm_ds.tasks import TASKS, Task, get_task, hf
from lgtm_ds.tasks.base import SOURCE_INDEX, ModelOptions
from lgtm_ds.tasks.classification import ClassificationTask, divergence_f64

from .helpers import random_batch, tiny_model

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lgtm_ds"


def _imports(path: Path) -> set[str]:
    """Top-level module names a file imports (absolute imports; relative ones are ours)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", ["methods", "tasks"])
def test_methods_and_tasks_import_no_deepspeed_triton_wandb_yaml(package):
    for path in sorted((LIB / package).glob("*.py")):
        bad = _imports(path) & {"deepspeed", "triton", "wandb", "yaml"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


# the DeepSpeed seams: the adapter, the process group, the optimizer state per ZeRO stage, the
# student's ZeRO-3 passes, and the list of the private attributes they read
DEEPSPEED_MODULES = {
    "deepspeed.py",
    "dist.py",
    "zero_state.py",
    "zero3_functional.py",
    "ds_private.py",
}


def test_only_the_deepspeed_seams_import_deepspeed():
    allowed = {LIB / "engines" / name for name in DEEPSPEED_MODULES}
    assert all(p.exists() for p in allowed)
    for path in sorted(LIB.rglob("*.py")):
        if path not in allowed:
            assert "deepspeed" not in _imports(path), f"{path.relative_to(ROOT)} imports deepspeed"


def test_only_the_student_runs_influence_passes():
    """The influence-pass operations are their own protocol (InfluencePasses): the methods call
    them on the student's engine only, and on DeepSpeed only the student's engine has them."""
    from lgtm_ds.engines.base import Engine, InfluencePasses
    from lgtm_ds.engines.deepspeed import DeepSpeedEngine, DeepSpeedStudentEngine

    passes = {n for n, v in vars(InfluencePasses).items() if callable(v) and not n.startswith("__")}
    assert passes and not passes & set(vars(Engine))
    assert issubclass(DeepSpeedStudentEngine, InfluencePasses)
    assert not issubclass(DeepSpeedEngine, InfluencePasses)
    for path in sorted((LIB / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in passes:
                owner = node.value
                role = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                assert role != "teacher", f"{path.name}:{node.lineno}: teacher.{node.attr}"


def test_launch_files_hold_no_logic():
    """Entry points: a docstring, imports, the repo on sys.path, ``sys.exit(main())``."""
    for path in sorted((ROOT / "launch").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            ok = isinstance(node, ast.Import | ast.ImportFrom | ast.Assign | ast.If) or (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            )
            assert ok, f"{path.name}:{node.lineno}: {type(node).__name__} in an entry point"
        assert len(path.read_text().splitlines()) < 30, f"{path.name} is not a thin entry point"


def test_training_components_create_their_attributes_in_init():
    """The trainer, the evaluator and the other training components assign only attributes
    that ``__init__`` created (no state appears half-way, read back with getattr)."""
    for path in sorted((LIB / "training").glob("*.py")):
        for cls in ast.walk(ast.parse(path.read_text())):
            if not isinstance(cls, ast.ClassDef):
                continue
            made: dict[str, set[str]] = {}
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef):
                    targets = [
                        t
                        for node in ast.walk(fn)
                        for top in getattr(node, "targets", [getattr(node, "target", None)])
                        for t in (top.elts if isinstance(top, ast.Tuple) else [top])
                    ]
                    made[fn.name] = {
                        t.attr
                        for t in targets
                        if isinstance(t, ast.Attribute) and getattr(t.value, "id", "") == "self"
                    }
            if "__init__" not in made:
                continue
            late = set().union(*made.values()) - made["__init__"]
            assert not late, f"{path.name}: {cls.name} creates {sorted(late)} outside __init__"
            assert "getattr(self" not in ast.unparse(cls), f"{path.name}: {cls.name}"


def test_registries_are_the_only_lists():
    assert method_names() == ("lgtm", "metadistil", "online_kd", "vanilla_kd")
    assert set(TASKS.names()) == {"causal_lm", "classification", "regression"}
    with pytest.raises(ConfigError, match="method.name must be one of .*did you mean 'lgtm'"):
        get_method("lgtmm")
    with pytest.raises(ConfigError, match="classification"):
        get_task("clasification")


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
    d = Distiller(
        "frozen_teacher_kd",
        teacher=t,
        student=s,
        teacher_optimizer=build_adamw(t, 1e-3, 0.0),
        student_optimizer=build_adamw(s, 1e-3, 0.0),
    )
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


class SmoothedClassification(ClassificationTask):
    """A task type as a user would add one: label-smoothed cross-entropy."""

    name = "smoothed_classification"
    calls = 0

    def task_loss(self, logits, labels):
        type(self).calls += 1
        return torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=0.1)


def test_a_new_task_type_is_one_class():
    TASKS.register(SmoothedClassification)
    try:
        t, s = tiny_model(seed=1), tiny_model(seed=2)
        kw = dict(
            teacher=t,
            student=s,
            teacher_optimizer=build_adamw(t, 1e-3, 0.0),
            student_optimizer=build_adamw(s, 1e-3, 0.0),
            alpha_student=0.5,
        )
        d = Distiller("lgtm", task="smoothed_classification", **kw)
        assert isinstance(d.task, SmoothedClassification)
        SmoothedClassification.calls = 0
        m = d.step(random_batch(8, 1), random_batch(8, 2))
        assert torch.isfinite(m["influence"]).all()
        # the step uses the new task's own loss: L_s in steps A and E, the quiz loss in C, and
        # in D the teacher's logit gradient (by autograd: no closed form declared) and its loss
        assert SmoothedClassification.calls == 5
        assert m["quiz_ce_lookahead"] > 0
    finally:
        TASKS.unregister(SmoothedClassification.name)


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


def test_model_building_leaves_the_global_rng_alone():
    """Embedded weights are a function of (config, train.seed, role); building them does not
    reset the global RNG, so dropout still follows train.seed."""
    task = get_task("classification")(num_labels=3)

    def build(role, seed):
        return task.build_model(
            "embedded:tiny", role=role, options=ModelOptions(vocab_size=50, seed=seed)
        )

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build("student", 7)
    assert torch.equal(torch.get_rng_state(), state)
    b, c, d = build("student", 7), build("student", 8), build("teacher", 7)
    pa, pb, pc, pd = (next(m.parameters()) for m in (a, b, c, d))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc) and not torch.equal(pa, pd)


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in LIB.rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found | {"lgtm_kernels"} == listed


def test_the_api_and_the_cli_share_every_default():
    """One definition per default: the Distiller and the reference form take the experiment's
    method section (every hyper-parameter keyword-only, no second set of defaults), and the
    Distiller's other keywords default as the config keys they stand for."""
    cfg = ExperimentConfig()
    t, s = tiny_model(seed=1), tiny_model(seed=2)
    d = Distiller(teacher=t, student=s, student_optimizer=build_adamw(s, 1e-3, 0.0))
    assert d.config == cfg.method == method_config()
    assert d.config.alpha_student == 0.5  # the default run's (random-init teacher)
    sig = inspect.signature(Distiller).parameters
    assert sig["fused_head"].default is cfg.model.fused_head is True
    assert sig["gradient_accumulation_steps"].default == cfg.train.gradient_accumulation_steps
    assert sig["max_grad_norm"].default == cfg.train.max_grad_norm
    positional = [n for n, p in sig.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == ["method"]  # no positional hyper-parameter list
    for fn in (Distiller, naive_lgtm_step):
        own = set(inspect.signature(fn).parameters) & set(cfg.method.model_fields)
        assert not own, f"{fn.__name__} defines {own} again"
    # the 0.9 keywords still work, flat, and are checked as the config checks them
    d = Distiller("lgtm", teacher=t, student=s, alpha_student=1.0, fd_radius=1e-3)
    assert d.config.alpha_student == 1.0 and d.config.lgtm.fd_radius == 1e-3
    with pytest.raises(ConfigError, match="method.lgtm.fd_radius must be > 0"):
        Distiller("lgtm", teacher=t, student=s, fd_radius=0)
    with pytest.raises(ConfigError, match="did you mean 'alpha_student'"):
        Distiller("lgtm", teacher=t, student=s, alpha_studnet=1.0)
