"""Experiment config: schema defaults, YAML + overrides, coercion, validation, CLI, DeepSpeed dict
resolution, export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from lgtm_ds.config import (
    DEFAULT_DS_CONFIG,
    ExperimentConfig,
    MethodConfig,
    TrainConfig,
    build_ds_config,
    config_to_dict,
    deep_merge,
    dump_default_yaml,
    load_config,
    parse_args,
    save_resolved,
)
from lgtm_ds.config.schema import SECTIONS
from lgtm_ds.errors import ConfigError
from lgtm_ds.io import atomic_write_text, write_json_atomic
from lgtm_ds.methods import METHODS

REPO = Path(__file__).resolve().parents[2]
DS_JSONS = sorted((REPO / "ds_configs").glob("*.json"))
EXAMPLES = sorted((REPO / "configs" / "examples").glob("*.yaml")) + sorted(
    (REPO / "configs" / "real").glob("*.yaml")
)
DEFAULT_YAML = REPO / "configs" / "default.yaml"


def write_yaml(tmp_path: Path, data, name: str = "exp.yaml") -> str:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def write_json(tmp_path: Path, data, name: str = "ds.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def raises(match_all: list[str], fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    for part in match_all:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------- loading


def test_default_experiment():
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert cfg.model.teacher == "embedded:teacher" and cfg.model.student == "embedded:student"
    assert cfg.model.tokenizer is None  # with an embedded: teacher = the embedded tokenizer
    assert cfg.model.zero_init_classifier is False
    assert cfg.data.source == "synthetic" and cfg.data.synthetic_examples == 3000
    assert cfg.data.max_length == 64
    m = cfg.method
    assert (m.name, m.alpha_student, m.alpha_teacher) == ("lgtm", 0.5, 0.4)
    assert cfg.method.temperature == 1.0 and cfg.method.lgtm.fd_radius == pytest.approx(1e-2)
    t = cfg.train
    assert (t.micro_batch_size, t.max_steps, t.eval_every, t.precision) == (32, 300, 100, "fp32")
    assert t.student_lr == pytest.approx(1e-3) and t.teacher_lr == pytest.approx(1e-3)
    assert t.warmup_ratio == pytest.approx(0.1)
    assert cfg.output.dir == "outputs/lgtm-default"
    assert cfg.deepspeed.config is None and cfg.deepspeed.teacher == {}


def test_default_yaml_is_generated_from_the_schema():
    assert DEFAULT_YAML.read_text() == dump_default_yaml(), (
        "configs/default.yaml is out of date with lgtm_ds/config/schema.py; regenerate it: "
        "python -m lgtm_ds.config > configs/default.yaml"
    )
    assert load_config(str(DEFAULT_YAML)) == ExperimentConfig()


def test_default_yaml_lists_every_key_with_a_comment():
    text = DEFAULT_YAML.read_text()
    data = yaml.safe_load(text)
    assert set(data) == set(config_to_dict(ExperimentConfig()))
    for section, values in config_to_dict(ExperimentConfig()).items():
        assert set(data[section]) == set(values), section
    for line in text.splitlines():
        assert len(line) <= 100, line
        if line.startswith("  ") and ":" in line.split("#")[0]:
            assert "#" in line, f"uncommented key: {line!r}"


def test_every_field_has_a_description():
    for name, field in ExperimentConfig.model_fields.items():
        assert field.description, name
        for key, sub in SECTIONS[name].model_fields.items():
            assert sub.description and sub.description.strip(), f"{name}.{key}"


def test_yaml_with_one_change_is_the_default_experiment_with_that_change(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {"method": {"name": "online_kd"}}))
    assert cfg == ExperimentConfig(method=MethodConfig(name="online_kd"))
    assert cfg == ExperimentConfig(method={"name": "online_kd"})
    assert cfg.train == ExperimentConfig().train and cfg.method.alpha_student == 0.5


def test_yaml_then_overrides_later_wins(tmp_path):
    path = write_yaml(
        tmp_path,
        {"train": {"micro_batch_size": 8, "student_lr": 2e-5}, "method": {"name": "online_kd"}},
    )
    cfg = load_config(
        path, ["train.micro_batch_size=4", "train.micro_batch_size=16", "method.temperature=2"]
    )
    assert cfg.train.micro_batch_size == 16  # later override wins over earlier and YAML
    assert cfg.train.student_lr == pytest.approx(2e-5)  # YAML kept
    assert cfg.method.name == "online_kd" and cfg.method.temperature == 2.0
    assert cfg.train.teacher_lr == TrainConfig().teacher_lr  # absent in YAML -> schema default
    # dict overrides: dotted and nested
    cfg = load_config(path, {"train.micro_batch_size": 2, "data": {"max_length": 64}})
    assert cfg.train.micro_batch_size == 2 and cfg.data.max_length == 64


def test_empty_yaml_gives_the_defaults(tmp_path):
    cfg = load_config(write_yaml(tmp_path, ""))
    assert cfg == ExperimentConfig()


def test_round_trip_through_dict(tmp_path):
    cfg = load_config(None, ["deepspeed.teacher.zero_optimization.stage=3"])
    again = load_config(write_yaml(tmp_path, config_to_dict(cfg)))
    assert again == cfg


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_yamls_load(path, monkeypatch):
    cfg = load_config(str(path))
    monkeypatch.chdir(REPO)  # example ds_config paths are relative to the repo root
    for role in ("teacher", "student"):
        build_ds_config(cfg, role, world_size=2)


# What the old config code (dataclass defaults = the LGTM reference values) resolved each example
# to, for the keys whose default changed to the embedded experiment's.
OLD_RESOLUTION = {
    "glue_sst2.yaml": {
        "model.tokenizer": None,
        "model.zero_init_classifier": True,
        "data.max_length": 128,
        "method.alpha_student": 1.0,
        "train.max_steps": None,
        "train.student_lr": 5e-5,
        "train.teacher_lr": 3e-5,
        "train.warmup_ratio": 0.0,
    },
    "local_files.yaml": {
        "model.tokenizer": None,
        "model.zero_init_classifier": True,
        "data.max_length": 256,
        "method.alpha_student": 1.0,
        "train.max_steps": None,
        "train.student_lr": 5e-5,
        "train.teacher_lr": 2e-5,
        "train.warmup_ratio": 0.06,
    },
}


@pytest.mark.parametrize(
    "path", [p for p in EXAMPLES if p.name in OLD_RESOLUTION], ids=lambda p: p.name
)
def test_examples_resolve_as_before_the_default_change(path):
    cfg = config_to_dict(load_config(str(path)))
    expected = OLD_RESOLUTION[path.name]
    got = {key: cfg[key.split(".")[0]][key.split(".")[1]] for key in expected}
    assert got == expected


def test_example_local_files_has_zero3_teacher(monkeypatch):
    cfg = load_config(str(REPO / "configs" / "examples" / "local_files.yaml"))
    monkeypatch.chdir(REPO)
    assert build_ds_config(cfg, "teacher", 1)["zero_optimization"]["stage"] == 3
    assert build_ds_config(cfg, "student", 1)["zero_optimization"]["stage"] == 2


# ---------------------------------------------------------------------------------- coercion


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("train.micro_batch_size=8", "train", "micro_batch_size", 8),
        ("train.micro_batch_size=1e1", "train", "micro_batch_size", 10),
        ("train.student_lr=1e-3", "train", "student_lr", 1e-3),
        ("train.epochs=3", "train", "epochs", 3.0),
        ("output.overwrite=true", "output", "overwrite", True),
        ("output.overwrite=yes", "output", "overwrite", True),
        ("output.overwrite=1", "output", "overwrite", True),
        ("output.overwrite=no", "output", "overwrite", False),
        ("output.overwrite=0", "output", "overwrite", False),
        ("model.zero_init_classifier=False", "model", "zero_init_classifier", False),
        ("output.run_name=2024", "output", "run_name", "2024"),
        ("model.tokenizer=null", "model", "tokenizer", None),
        ("model.tokenizer=None", "model", "tokenizer", None),
        ("model.dropout=0.1", "model", "dropout", 0.1),
        ("model.dropout=none", "model", "dropout", None),
        ("model.dropout=~", "model", "dropout", None),
        ("model.dropout=", "model", "dropout", None),
        ("output.overwrite=false", "output", "overwrite", False),
        ("output.resume=auto", "output", "resume", "auto"),
        ("train.seed= 7 ", "train", "seed", 7),
        ("train.max_steps=null", "train", "max_steps", None),
        ("train.max_steps=20", "train", "max_steps", 20),
        ("data.text_columns=[a, b]", "data", "text_columns", ["a", "b"]),
        ("data.text_columns=question,passage", "data", "text_columns", ["question", "passage"]),
        ("data.text_columns=sentence", "data", "text_columns", ["sentence"]),
        (
            "deepspeed.teacher={zero_optimization: {stage: 3}}",
            "deepspeed",
            "teacher",
            {"zero_optimization": {"stage": 3}},
        ),
    ],
)
def test_override_coercion(override, section, key, expected):
    value = getattr(getattr(load_config(None, [override]), section), key)
    assert value == (pytest.approx(expected) if isinstance(expected, float) else expected)
    assert type(value) is type(expected)


def test_yaml_values_are_coerced_too(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string and "8" quoted as a string: both become numbers.
    path = write_yaml(
        tmp_path,
        "train:\n  student_lr: 1e-3\n  micro_batch_size: '8'\n"
        "data:\n  text_columns: premise, hypothesis\n"
        "deepspeed:\n  teacher: '{zero_optimization: {stage: 3}}'\n"
        "output:\n  run_name: 2024\n  overwrite: yes\n",
    )
    cfg = load_config(path)
    assert cfg.train.student_lr == pytest.approx(1e-3) and cfg.train.micro_batch_size == 8
    assert cfg.data.text_columns == ["premise", "hypothesis"]
    assert cfg.deepspeed.teacher == {"zero_optimization": {"stage": 3}}
    assert cfg.output.run_name == "2024" and cfg.output.overwrite is True


@pytest.mark.parametrize(
    "override, key, typename",
    [
        ("train.micro_batch_size=abc", "train.micro_batch_size", "int"),
        ("train.micro_batch_size=2.5", "train.micro_batch_size", "int"),
        ("train.student_lr=fast", "train.student_lr", "float"),
        ("output.overwrite=maybe", "output.overwrite", "bool"),
        ("model.dropout=lots", "model.dropout", "float | null"),
        ("deepspeed.teacher=[1, 2]", "deepspeed.teacher", "dict"),
    ],
)
def test_bad_coercion_names_key_value_type(override, key, typename):
    value = override.split("=", 1)[1]
    raises([key, repr(value), typename], load_config, None, [override])


def test_bool_yaml_value_for_int_is_rejected(tmp_path):
    raises(
        ["train.micro_batch_size", "True", "int"],
        load_config,
        write_yaml(tmp_path, {"train": {"micro_batch_size": True}}),
    )


def test_deep_dict_override_merges_into_yaml_dict(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "deepspeed": {
                "teacher": {
                    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}
                }
            }
        },
    )
    cfg = load_config(
        path, ["deepspeed.teacher.zero_optimization.stage=2", "deepspeed.student.bf16.enabled=auto"]
    )
    assert cfg.deepspeed.teacher == {
        "zero_optimization": {"stage": 2, "stage3_param_persistence_threshold": 0}
    }
    assert cfg.deepspeed.student == {"bf16": {"enabled": "auto"}}
    # a value for the field itself replaces the YAML's dict; later deep keys merge into it
    cfg = load_config(path, ["deepspeed.teacher={}", "deepspeed.teacher.bf16={enabled: auto}"])
    assert cfg.deepspeed.teacher == {"bf16": {"enabled": "auto"}}
    cfg = load_config(
        None,
        [
            "deepspeed.teacher={zero_optimization: {stage: 3}}",
            "deepspeed.teacher.zero_optimization.overlap_comm=false",
        ],
    )
    assert cfg.deepspeed.teacher == {"zero_optimization": {"stage": 3, "overlap_comm": False}}


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "override, parts",
    [
        ("method.name=lgtmm", ["method.name", "lgtm", "online_kd", "vanilla_kd", "'lgtmm'"]),
        ("method.alpha_teacher=1.5", ["method.alpha_teacher must be in [0, 1], got 1.5"]),
        ("method.alpha_student=-0.1", ["method.alpha_student", "[0, 1]"]),
        ("method.temperature=0", ["method.temperature must be > 0"]),
        ("method.lgtm.fd_radius=-1e-3", ["method.lgtm.fd_radius must be > 0"]),
        ("method.fd_radius=nan", ["method.lgtm.fd_radius"]),  # the 0.9 spelling, mapped
        ("train.precision=fp8", ["train.precision", "fp32", "bf16", "fp16"]),
        ("train.micro_batch_size=0", ["train.micro_batch_size must be > 0"]),
        ("train.gradient_accumulation_steps=-1", ["train.gradient_accumulation_steps"]),
        ("train.eval_batch_size=0", ["train.eval_batch_size"]),
        ("train.student_lr=-1e-5", ["train.student_lr must be >= 0"]),
        ("train.teacher_lr=-1", ["train.teacher_lr must be >= 0"]),
        ("train.warmup_ratio=1.0", ["train.warmup_ratio must be in [0, 1)"]),
        ("train.epochs=0", ["train.epochs must be > 0"]),
        ("train.max_steps=0", ["train.max_steps", "null or > 0"]),
        ("train.max_grad_norm=-1", ["train.max_grad_norm"]),
        ("train.eval_every=-5", ["train.eval_every"]),
        ("data.source=s3", ["data.source", "synthetic", "glue", "files", "hub"]),
        ("data.quiz_source=test", ["data.quiz_source", "train", "validation"]),
        ("data.quiz_fraction=0", ["data.quiz_fraction must be in (0, 0.5]"]),
        ("data.quiz_fraction=0.6", ["data.quiz_fraction must be in (0, 0.5]"]),
        ("data.text_columns=[a, b, c]", ["data.text_columns", "1 or 2"]),
        ("data.text_columns=[]", ["data.text_columns", "1 or 2"]),
        ("data.max_length=4", ["data.max_length must be >= 8"]),
        ("data.synthetic_examples=0", ["data.synthetic_examples"]),
        ("data.max_train_examples=0", ["data.max_train_examples"]),
        ("model.dropout=1.0", ["model.dropout"]),
        ("model.teacher=", ["model.teacher"]),
        ("output.checkpoint_every=-1", ["output.checkpoint_every"]),
    ],
)
def test_validation_errors_name_the_dotted_key(override, parts):
    raises(parts, load_config, None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.alpha_teacher=1.5", "method.alpha_teacher must be in [0, 1], got 1.5"),
        ("train.micro_batch_size=0", "train.micro_batch_size must be > 0, got 0"),
        ("data.quiz_fraction=0.6", "data.quiz_fraction must be in (0, 0.5], got 0.6"),
        ("train.precision=fp8", "train.precision must be one of {fp32, bf16, fp16}, got 'fp8'"),
        ("train.micro_batch_size=abc", "train.micro_batch_size: cannot convert 'abc' to int"),
        ("train.max_steps=0", "train.max_steps must be null or > 0, got 0"),
        ("model.dropout=1", "model.dropout must be null or in [0, 1), got 1.0"),
        ("model.teacher= ", "model.teacher must be a non-empty string, got ' '"),
        (
            "method.name=lgtmm",
            "method.name must be one of {lgtm, metadistil, online_kd, student_only, "
            "vanilla_kd}, got 'lgtmm'; did you mean 'lgtm'?",
        ),
    ],
)
def test_validation_messages(override, message):
    assert raises([], load_config, None, [override]) == message


def test_unknown_key_message():
    msg = raises([], load_config, None, ["train.micro_batchsize=8"])
    valid = ", ".join(TrainConfig.model_fields)
    assert msg == (
        f"unknown key 'train.micro_batchsize' (valid keys of train: {valid}); "
        "did you mean 'micro_batch_size'?"
    )


def test_error_from_yaml_names_the_file_and_lists_every_bad_key(tmp_path):
    path = write_yaml(tmp_path, {"train": {"micro_batch_size": 0, "seed": -1}})
    msg = raises([], load_config, path, ["method.temperature=0"])
    assert msg.splitlines() == [
        "method.temperature must be > 0, got 0.0",  # from the command line: no file
        f"train.seed must be >= 0, got -1 (in {path})",
        f"train.micro_batch_size must be > 0, got 0 (in {path})",
    ]


def test_method_checks_its_config_at_load_time():
    raises(["method lgtm", "train.precision=fp16"], load_config, None, ["train.precision=fp16"])
    assert load_config(None, ["train.precision=fp16", "method.name=online_kd"])


def test_direct_construction_is_validated_and_configs_are_frozen():
    raises(
        ["train.micro_batch_size must be > 0, got 0"],
        ExperimentConfig,
        train={"micro_batch_size": 0},
    )
    raises(["method.alpha_student must be in [0, 1], got 2"], MethodConfig, alpha_student=2)
    raises(["unknown key 'train.bogus'"], TrainConfig, bogus=1)
    raises(["data must be a mapping, got 3"], ExperimentConfig, data=3)
    cfg = load_config()
    with pytest.raises(ValueError):
        cfg.train.seed = 1  # type: ignore[misc]
    assert cfg == load_config() and cfg != load_config(None, ["train.seed=1"])


def test_cross_field_validation():
    raises(["data.task", "glue"], load_config, None, ["data.source=glue"])
    raises(["data.train_file", "files"], load_config, None, ["data.source=files"])
    cfg = load_config(None, ["data.source=glue", "data.task=sst2"])
    assert cfg.data.task == "sst2"


def test_validation_runs_on_yaml_values_and_direct_construction(tmp_path):
    raises(
        ["method.alpha_teacher must be in [0, 1], got 1.5"],
        load_config,
        write_yaml(tmp_path, {"method": {"alpha_teacher": 1.5}}),
    )
    raises(["train.precision"], TrainConfig, precision="fp64")
    # an override can repair a bad YAML value: validation sees the merged dict only
    cfg = load_config(
        write_yaml(tmp_path, {"method": {"alpha_teacher": 1.5}}), ["method.alpha_teacher=0.5"]
    )
    assert cfg.method.alpha_teacher == 0.5


def test_unknown_keys_named_with_valid_keys_and_suggestion(tmp_path):
    msg = raises(
        [
            "'train.micro_batchsize'",
            "micro_batch_size",
            "student_lr",
            "did you mean 'micro_batch_size'",
        ],
        load_config,
        write_yaml(tmp_path, {"train": {"micro_batchsize": 8}}),
    )
    assert "valid keys of train" in msg
    raises(
        [
            "'trian'",
            "model",
            "data",
            "method",
            "train",
            "deepspeed",
            "output",
            "did you mean 'train'",
        ],
        load_config,
        write_yaml(tmp_path, {"trian": {}}),
    )
    raises(
        ["'method.alpha_techer'", "did you mean 'alpha_teacher'"],
        load_config,
        None,
        ["method.alpha_techer=0.3"],
    )
    raises(["'train.student_lr.x'", "no sub-keys"], load_config, None, ["train.student_lr.x=1"])


@pytest.mark.parametrize(
    "content, parts",
    [
        (None, ["does not exist", "missing.yaml"]),
        ("train: [unclosed\n", ["does not parse", "exp.yaml"]),
        ("- a\n- b\n", ["top level must be a mapping", "exp.yaml"]),
        ("train: 5\n", ["train must be a mapping"]),
    ],
)
def test_bad_yaml_files(tmp_path, content, parts):
    path = str(tmp_path / "missing.yaml") if content is None else write_yaml(tmp_path, content)
    raises(parts, load_config, path)
    if content == "train: 5\n":  # an override into the bad section must not hide it
        raises(parts, load_config, path, ["train.seed=1"])


def test_empty_section_in_yaml_is_fine(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "train:\nmethod:\n"), ["train.seed=7"])
    assert cfg.train.seed == 7 and cfg.method == ExperimentConfig().method


# ---------------------------------------------------------------------------------- CLI


def test_parse_args_flags_and_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    path = write_yaml(tmp_path, {"train": {"micro_batch_size": 8}})
    ds = write_json(tmp_path, DEFAULT_DS_CONFIG)
    cfg, args = parse_args(
        [
            "--config",
            path,
            "--local_rank=1",
            "--ds_config",
            ds,
            "--train.micro_batch_size=4",
            "--method.temperature",
            "2.5",
            "--deepspeed.teacher.zero_optimization.stage=3",
            "--output.overwrite",
            "--train.micro_batch_size",
            "12",
        ]
    )
    assert args.local_rank == 1 and args.config == path and args.ds_config == ds
    assert cfg.train.micro_batch_size == 12  # later flag wins
    assert cfg.method.temperature == 2.5
    assert cfg.deepspeed.config == ds
    assert cfg.deepspeed.teacher == {"zero_optimization": {"stage": 3}}
    assert cfg.output.overwrite is True
    assert build_ds_config(cfg, "teacher", 1)["zero_optimization"]["stage"] == 3
    assert build_ds_config(cfg, "student", 1)["zero_optimization"]["stage"] == 2


def test_parse_args_local_rank_forms_and_env(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    _, args = parse_args([])
    assert args.local_rank == 3
    _, args = parse_args(["--local_rank", "0"])
    assert args.local_rank == 0
    monkeypatch.delenv("LOCAL_RANK")
    cfg, args = parse_args([])
    assert args.local_rank == -1 and cfg == load_config()


def test_parse_args_errors():
    raises(["--bogus"], parse_args, ["--bogus=1"])
    raises(
        ["--trian.micro_batch_size", "did you mean 'train'"],
        parse_args,
        ["--trian.micro_batch_size=1"],
    )
    raises(["--train.micro_bs", "micro_batch_size"], parse_args, ["--train.micro_bs=1"])
    raises(["'stray'"], parse_args, ["stray"])
    raises(["--train.student_lr needs a value"], parse_args, ["--train.student_lr"])
    raises(["--config needs a value"], parse_args, ["--config"])
    raises(["does not exist", "nope.yaml"], parse_args, ["--config", "nope.yaml"])


def test_parse_args_forms(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg, args = parse_args(
        [
            "--local-rank=2",
            "--deepspeed.teacher.zero_optimization.stage",
            "3",
            "--train.seed",
            "-1",  # a negative number is a value, not a flag
            "--train.seed=5",
            "--output.overwrite",
        ]
    )
    assert args.local_rank == 2 and args.config is None and args.ds_config is None
    assert cfg.deepspeed.teacher == {"zero_optimization": {"stage": 3}}
    assert cfg.train.seed == 5 and cfg.output.overwrite is True
    assert args.overrides[-1] == "output.overwrite=true"
    raises(["--local_rank", "'x'"], parse_args, ["--local_rank=x"])
    raises(["--output.dir needs a value"], parse_args, ["--output.dir"])
    raises(["'--'"], parse_args, ["--"])


def test_parse_args_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as ei:
        parse_args(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--ds_config", "--local_rank"):
        assert flag in out
    for section, cls in SECTIONS.items():
        for key, field in cls.model_fields.items():
            sub = getattr(field.annotation, "model_fields", None)
            for leaf in sub or [None]:  # a method's own section: its keys
                dotted = f"{section}.{key}" + (f".{leaf}" if leaf else "")
                assert f"--{dotted}=" in out, dotted
    assert "--train.micro_batch_size=32" in out and "examples per rank" in out
    assert "one of {fp32, bf16, fp16}" in out


# ---------------------------------------------------------------------------------- DeepSpeed


def test_deep_merge():
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    merged = deep_merge(base, {"a": {"b": 3}, "d": [2], "e": {}})
    assert merged == {"a": {"b": 3, "c": 2}, "d": [2], "e": {}}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}  # not mutated


def test_builtin_default_equals_zero2_json():
    assert json.loads((REPO / "ds_configs" / "zero2.json").read_text()) == DEFAULT_DS_CONFIG


def test_build_fills_autos_and_role_overrides():
    cfg = load_config(
        None,
        [
            "train.micro_batch_size=8",
            "train.gradient_accumulation_steps=3",
            "train.max_grad_norm=1.0",
            "train.precision=bf16",
            "deepspeed.teacher.zero_optimization.stage=3",
        ],
    )
    t = build_ds_config(cfg, "teacher", world_size=2)
    s = build_ds_config(cfg, "student", world_size=2)
    for ds in (t, s):
        assert ds["train_micro_batch_size_per_gpu"] == 8
        assert ds["gradient_accumulation_steps"] == 3
        assert ds["train_batch_size"] == 8 * 3 * 2
        assert ds["gradient_clipping"] == 1.0
        assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
        assert ds["steps_per_print"] >= 10**9 and ds["wall_clock_breakdown"] is False
        assert "optimizer" not in ds and "scheduler" not in ds
        assert "auto" not in json.dumps(ds)
    assert t["zero_optimization"]["stage"] == 3 and s["zero_optimization"]["stage"] == 2
    assert t["zero_optimization"]["overlap_comm"] is True  # rest of the JSON kept
    assert DEFAULT_DS_CONFIG["train_batch_size"] == "auto"  # built-in default not mutated


def test_build_fp16_loss_scaling_defaults(tmp_path):
    cfg = load_config(None, ["train.precision=fp16", "method.name=online_kd"])
    ds = build_ds_config(cfg, "student", 1)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert ds["bf16"]["enabled"] is False
    # user loss-scaling values are kept
    js = dict(DEFAULT_DS_CONFIG, fp16={"enabled": "auto", "initial_scale_power": 12})
    path = write_json(tmp_path, js)
    cfg = load_config(
        None, ["train.precision=fp16", "method.name=online_kd", f"deepspeed.config={path}"]
    )
    assert build_ds_config(cfg, "student", 1)["fp16"]["initial_scale_power"] == 12


def test_build_accepts_equal_hard_values_and_missing_keys(tmp_path):
    js = {
        "train_micro_batch_size_per_gpu": 32,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 64,
        "gradient_clipping": 0,
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 7,
    }
    cfg = load_config(None, [f"deepspeed.config={write_json(tmp_path, js)}"])
    ds = build_ds_config(cfg, "teacher", world_size=2)
    assert ds["train_batch_size"] == 64 and ds["fp16"] == {"enabled": False}
    assert ds["steps_per_print"] == 7  # given -> kept
    # an empty JSON is fine: everything the experiment owns is filled in
    cfg = load_config(None, [f"deepspeed.config={write_json(tmp_path, {}, 'empty.json')}"])
    assert build_ds_config(cfg, "student", 4)["train_batch_size"] == 32 * 4


@pytest.mark.parametrize(
    "json_over, parts",
    [
        (
            {"train_micro_batch_size_per_gpu": 16},
            [
                "train_micro_batch_size_per_gpu=16",
                "train.micro_batch_size=32",
                "the experiment YAML owns it",
                'write "auto"',
            ],
        ),
        (
            {"gradient_accumulation_steps": 4},
            ["gradient_accumulation_steps=4", "train.gradient_accumulation_steps=1"],
        ),
        ({"train_batch_size": 32}, ["train_batch_size=32", "world_size(2)"]),
        ({"gradient_clipping": 1.0}, ["gradient_clipping=1.0", "train.max_grad_norm=0.0"]),
        ({"bf16": {"enabled": True}}, ["bf16.enabled=true", "train.precision=fp32"]),
        ({"fp16": {"enabled": True}}, ["fp16.enabled=true", "train.precision=fp32"]),
    ],
)
def test_build_rejects_conflicting_hard_value(tmp_path, json_over, parts):
    path = write_json(tmp_path, dict(DEFAULT_DS_CONFIG, **json_over))
    cfg = load_config(None, [f"deepspeed.config={path}"])
    raises([path] + parts, build_ds_config, cfg, "student", 2)


def test_build_rejects_conflict_from_role_override():
    cfg = load_config(None, ["deepspeed.teacher.train_micro_batch_size_per_gpu=4"])
    raises(
        ["deepspeed.teacher", "train_micro_batch_size_per_gpu=4", "train.micro_batch_size=32"],
        build_ds_config,
        cfg,
        "teacher",
        1,
    )
    build_ds_config(cfg, "student", 1)  # the student's dict is not affected


@pytest.mark.parametrize("stage", [4, -1, "auto", "2", True])
def test_build_rejects_bad_stage(stage):
    cfg = load_config(None, {"deepspeed.teacher": {"zero_optimization": {"stage": stage}}})
    raises(["zero_optimization.stage", "0, 1, 2 or 3"], build_ds_config, cfg, "teacher", 1)


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_build_rejects_optimizer_and_scheduler_sections(tmp_path, section):
    path = write_json(tmp_path, dict(DEFAULT_DS_CONFIG, **{section: {"type": "AdamW"}}))
    cfg = load_config(None, [f"deepspeed.config={path}"])
    raises(
        [path, repr(section), "built by LGTM-DS", "remove the section"],
        build_ds_config,
        cfg,
        "teacher",
        1,
    )


def test_build_rejects_leftover_auto_and_bad_json(tmp_path):
    js = dict(DEFAULT_DS_CONFIG, zero_optimization={"stage": 3, "reduce_bucket_size": "auto"})
    cfg = load_config(None, [f"deepspeed.config={write_json(tmp_path, js)}"])
    raises(["zero_optimization.reduce_bucket_size", "auto"], build_ds_config, cfg, "student", 1)
    missing = str(tmp_path / "nope.json")
    raises(
        [missing, "does not exist"],
        build_ds_config,
        load_config(None, [f"deepspeed.config={missing}"]),
        "student",
        1,
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    raises(
        [str(bad), "not valid JSON"],
        build_ds_config,
        load_config(None, [f"deepspeed.config={bad}"]),
        "student",
        1,
    )
    raises(["role"], build_ds_config, load_config(), "critic", 1)
    raises(["world_size"], build_ds_config, load_config(), "student", 0)


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_ds_json_resolves_for_both_roles(path, precision):
    method = "online_kd" if precision == "fp16" else "lgtm"  # lgtm refuses fp16 (check_config)
    cfg = load_config(
        None,
        [f"deepspeed.config={path}", f"train.precision={precision}", f"method.name={method}"],
    )
    for role in ("teacher", "student"):
        ds = build_ds_config(cfg, role, world_size=2)
        assert ds["train_batch_size"] == 64
        assert "auto" not in json.dumps(ds)
        assert ds["zero_optimization"]["stage"] == int(path.stem.removeprefix("zero"))


def test_ds_dict_is_accepted_by_deepspeed_config_parser():
    """The resolved dict passes DeepSpeed's own config parser (no engine, no dist)."""
    ds_config_mod = pytest.importorskip("deepspeed.runtime.config")
    for path in DS_JSONS:
        cfg = load_config(None, [f"deepspeed.config={path}", "train.gradient_accumulation_steps=2"])
        ds = build_ds_config(cfg, "teacher", world_size=1)
        parsed = ds_config_mod.DeepSpeedConfig(ds)
        assert parsed.train_batch_size == 64 and parsed.gradient_accumulation_steps == 2
        assert parsed.zero_optimization_stage == int(path.stem.removeprefix("zero"))


# ---------------------------------------------------------------------------------- export


def test_save_resolved_writes_valid_yaml_atomically(tmp_path):
    cfg = load_config(None, ["deepspeed.teacher.zero_optimization.stage=3"])
    t, s = build_ds_config(cfg, "teacher", 2), build_ds_config(cfg, "student", 2)
    out = tmp_path / "run" / "resolved_config.yaml"
    out.parent.mkdir()
    out.write_text("old contents")
    save_resolved(cfg, t, s, out)
    doc = yaml.safe_load(out.read_text())
    assert set(doc) == {"experiment", "deepspeed_teacher", "deepspeed_student"}
    assert doc["deepspeed_teacher"] == t and doc["deepspeed_student"] == s
    assert load_config(write_yaml(tmp_path, doc["experiment"])) == cfg
    assert os.listdir(out.parent) == ["resolved_config.yaml"]  # no temp file left behind


def test_save_resolved_failure_leaves_old_file(tmp_path):
    out = tmp_path / "resolved.yaml"
    out.write_text("old")
    with pytest.raises(yaml.representer.RepresenterError):
        save_resolved(load_config(), {"bad": object()}, {}, out)
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["resolved.yaml"]


def test_atomic_writes(tmp_path):
    out = tmp_path / "new" / "deeper" / "summary.json"
    write_json_atomic(out, {"a": [1, 2], "b": None})
    assert out.read_text() == json.dumps({"a": [1, 2], "b": None}, indent=1) + "\n"
    atomic_write_text(out, "replaced")
    assert out.read_text() == "replaced"
    with pytest.raises(TypeError):
        atomic_write_text(out, 5)  # type: ignore[arg-type]
    assert out.read_text() == "replaced" and os.listdir(out.parent) == ["summary.json"]


# ---------------------------------------------------------------------- methods own their keys


def test_method_options_are_nested_and_the_flat_keys_of_0_9_map(tmp_path):
    flat = write_yaml(
        tmp_path,
        {
            "method": {
                "name": "online_kd",
                "fd_radius": 0.02,
                "influence_scale": 3,
                "pilot_lr": 1e-4,
            }
        },
    )
    nested = write_yaml(
        tmp_path,
        {
            "method": {
                "name": "online_kd",
                "lgtm": {"fd_radius": 0.02, "influence_scale": 3},
                "metadistil": {"pilot_lr": 1e-4},
            }
        },
        "nested.yaml",
    )
    a, b = load_config(flat), load_config(nested)
    assert a == b and a.method.lgtm.fd_radius == 0.02 and a.method.metadistil.pilot_lr == 1e-4
    # a command-line flag of either spelling overrides the file's key of either spelling
    assert load_config(flat, ["method.lgtm.fd_radius=0.5"]).method.lgtm.fd_radius == 0.5
    assert load_config(nested, ["--method.fd_radius=0.5"]).method.lgtm.fd_radius == 0.5
    both = write_yaml(tmp_path, {"method": {"fd_radius": 1, "lgtm": {"fd_radius": 2}}}, "b.yaml")
    raises(["method.fd_radius and method.lgtm.fd_radius are both set"], load_config, both)
    raises(["unknown key 'method.lgtm.pilot_lr'"], load_config, None, ["method.lgtm.pilot_lr=1"])
    # every option name is unique in the section, so the flat spelling has one meaning
    section = type(ExperimentConfig().method)
    own = [k for _, m in METHODS.items() if m.Options is not None for k in m.Options.model_fields]
    assert len(own) == len(set(own)) and not set(own) & set(section.model_fields)
    assert set(section.flat_keys) == set(own)
