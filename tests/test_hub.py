"""Model and dataset names checked before loading: missing folders, bad names, and a hub that is
offline or unreachable fail in seconds with one error naming the key; cached names then load
offline (no retries)."""

import os
import subprocess
import sys

import pytest

from lgtm_ds import ConfigError
from lgtm_ds import hub as hub_lib

from .helpers import ROOT, clean_env


@pytest.fixture
def no_hub(monkeypatch):
    monkeypatch.setattr(hub_lib, "hub_unavailable", lambda: "offline mode is set")


@pytest.mark.parametrize(
    "name,match",
    [
        ("./no/such/teacher", "model.teacher: no such folder './no/such/teacher'"),
        ("runs/exp1/student", "model.teacher: no such folder 'runs/exp1/student'"),
        ("~/nowhere-lgtm", "no such folder"),
        ("bad name!", "neither a local folder nor a Hugging Face Hub name"),
    ],
)
def test_bad_model_names(name, match, no_hub):
    with pytest.raises(ConfigError, match=match):
        hub_lib.check_sources([("model.teacher", name, "model")])


def test_local_folder_and_file_need_no_hub(tmp_path, monkeypatch):
    def fail():
        raise AssertionError("the hub was probed for a local folder")

    monkeypatch.setattr(hub_lib, "hub_unavailable", fail)
    (tmp_path / "data.jsonl").write_text("{}\n")
    hub_lib.check_sources(
        [
            ("model.teacher", str(tmp_path), "model"),
            ("data.dataset", str(tmp_path / "data.jsonl"), "dataset"),
        ]
    )


def test_uncached_hub_name_offline_is_one_error(no_hub):
    with pytest.raises(
        ConfigError, match=r"data.dataset: 'lgtm-ds-test/nope' .*not in the Hugging"
    ):
        hub_lib.check_sources([("data.dataset", "lgtm-ds-test/nope", "dataset")])


def test_unreachable_endpoint_is_detected_quickly(monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    hub_lib.hub_unavailable.cache_clear()
    try:
        t0 = time.time()
        why = hub_lib.hub_unavailable()
        assert why and "unreachable" in why and "127.0.0.1:9" in why
        assert time.time() - t0 < 6
    finally:
        hub_lib.hub_unavailable.cache_clear()


def _cache_repo(cache, repo_id: str) -> str:
    """A hub cache entry for ``repo_id`` (models--org--name/refs/main -> snapshots/<hash>)."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    return str(snap)


def test_cached_hub_models_train_with_the_hub_unreachable(tmp_path):
    """The README's 'no network' case: hub names already in the cache; the hub endpoint refuses
    connections -> the run goes offline at once and trains from the cache."""
    from transformers import AutoModelForSequenceClassification

    from lgtm_ds import data as data_lib
    from lgtm_ds.tasks.hf import embedded_bert_config

    cache = tmp_path / "hub"
    tok = data_lib.build_tokenizer("embedded", data_lib.synthetic_corpus_texts(400, 42))
    for repo, size in (("lgtm-ds-test/teacher", "student"), ("lgtm-ds-test/student", "tiny")):
        mcfg = embedded_bert_config(size, vocab_size=len(tok), num_labels=3)
        mcfg.architectures = ["BertForSequenceClassification"]
        snap = _cache_repo(cache, repo)
        AutoModelForSequenceClassification.from_config(mcfg).save_pretrained(snap)
        tok.save_pretrained(snap)
    env = clean_env()
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(k, None)
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT="http://127.0.0.1:9")
    args = [
        f"--output.dir={tmp_path / 'out'}",
        "--model.teacher=lgtm-ds-test/teacher",
        "--model.student=lgtm-ds-test/student",
        "--data.synthetic_examples=400",
        "--train.micro_batch_size=8",
        "--train.max_steps=2",
        "--train.eval_every=0",
    ]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "train.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "summary.json").exists()
    # not cached: one error naming the key, no traceback
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "train.py"),
            f"--output.dir={tmp_path / 'out2'}",
            args[1],
            "--model.student=lgtm-ds-test/not-cached",
            *args[3:],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "model.student: 'lgtm-ds-test/not-cached'" in proc.stderr
    assert "unreachable" in proc.stderr and "Traceback" not in proc.stderr
