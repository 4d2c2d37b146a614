"""Model and dataset names checked before loading: missing folders, bad names, and a hub that is
offline or unreachable fail in seconds with one error naming the key; cached names then load
offline (no retries).

The runs (trainer, ranks, processes); the in-process tests:
``tests/unit/test_hub.py``."""

import os
import subprocess
import sys

from ..helpers import ROOT, clean_env


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
