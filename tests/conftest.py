import os

# Triton kernels run on CPU under the interpreter; it must be set before anything imports
# triton (transformers does), hence here, first.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".torch_extensions")
)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def dist_env(monkeypatch):
    """In-process runs of the trainer: a one-rank process group on a free port."""
    from .helpers import free_port

    for k, v in dict(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    ).items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def make_distiller():
    """``make_distiller(method, teacher, student, lrs=..., wd=..., **kw)``: a Distiller over two
    plain modules with fresh AdamWs (``tests/helpers.py``)."""
    from .helpers import make_distiller

    return make_distiller
