"""The layout's rules, checked: what each package may import, launch/ holds no logic, and a new
method or task type is one class in one file (the trainer and the Distiller take it unchanged)."""

import ast
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
from lgtm_ds.tasks import TASKS, get_task
from lgtm_ds.tasks.base import ModelOptions
from lgtm_ds.tasks.classification import ClassificationTask

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


def test_only_the_adapter_touches_deepspeed():
    allowed = {LIB / "engines" / "deepspeed.py"}
    for path in sorted(LIB.rglob("*.py")):
        if path not in allowed:
            assert "deepspeed" not in _imports(path), f"{path.relative_to(ROOT)} imports deepspeed"


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
