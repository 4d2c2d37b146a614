"""No folder that the project puts on ``sys.path`` defines a top-level package or module whose
name a dependency imports. A script's own folder goes first on ``sys.path`` when it is started
(``deepspeed tests/ds_worker.py``, ``python launch/train.py``), so a ``tests/kernels/`` package
once hid the PyPI ``kernels`` package that transformers imports, and every worker died in
``import transformers``.

The runs (trainer, ranks, processes); the in-process tests:
``tests/unit/test_import_hygiene.py``."""

import subprocess
import sys

from ..helpers import clean_env
from ..unit.test_import_hygiene import ROOT  # noqa: F401


def test_a_worker_started_as_a_script_imports_transformers_and_builds_models():
    """In its own process, as ``deepspeed tests/ds_worker.py`` starts a rank."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "import_probe.py")],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok BertForSequenceClassification LlamaForCausalLM" in out.stdout, out.stdout
