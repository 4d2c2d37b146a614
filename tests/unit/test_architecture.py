"""The layout's rules, checked: what each package may import, launch/ holds no logic, and a new
method or task type is one class in one file (the trainer and the Distiller take it unchanged)."""

import ast
import inspect
from pathlib import Path

import pytest
import torch

from lgtm_ds import ConfigError, Distiller
from lgtm_ds.config import ExperimentConfig
from lgtm_ds.engines.optim import build_adamw
from lgtm_ds.methods import get_method, method_config, method_names
from lgtm_ds.methods.naive import naive_lgtm_step
from lgtm_ds.tasks import TASKS, get_task
from lgtm_ds.tasks.base import ModelOptions
from lgtm_ds.tasks.classification import ClassificationTask

from ..helpers import random_batch, tiny_model

ROOT = Path(__file__).resolve().parents[2]
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

    class TrainingOnly(Engine):  # an engine with the training API alone, as a teacher's
        def __init__(self, module):
            self.module = module

    t, s = tiny_model(seed=1), tiny_model(seed=2)
    with pytest.raises(ConfigError, match="does not implement InfluencePasses"):
        Distiller("lgtm", teacher=t, student=TrainingOnly(s))
    Distiller("online_kd", teacher=t, student=TrainingOnly(s))  # needs no passes
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
    assert method_names() == ("lgtm", "metadistil", "online_kd", "student_only", "vanilla_kd")
    assert set(TASKS.names()) == {"causal_lm", "classification", "regression"}
    with pytest.raises(ConfigError, match="method.name must be one of .*did you mean 'lgtm'"):
        get_method("lgtmm")
    with pytest.raises(ConfigError, match="classification"):
        get_task("clasification")


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
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "lgtm_ds.__version__"}  # the version is set in one place


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
