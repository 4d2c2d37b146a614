"""Model and dataset names checked before loading: missing folders, bad names, and a hub that is
offline or unreachable fail in seconds with one error naming the key; cached names then load
offline (no retries)."""

import pytest

from lgtm_ds import ConfigError
from lgtm_ds import hub as hub_lib


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
