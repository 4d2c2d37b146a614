"""Hidden-state distillation: the term vs a direct torch computation (float64, with and without
projection, mse / cosine, all positions / the first), the gradient reaching both models where
both learn (online KD, LGTM's teacher), the layer map, the saved student without projections.

The runs (trainer, ranks, processes); the in-process tests:
``tests/unit/test_hidden.py``."""

import torch
from transformers import AutoModelForSequenceClassification

from lgtm_ds.config import load_config
from lgtm_ds.methods.hidden import HIDDEN_PROJ


def test_trainer_saves_the_student_without_projections(tmp_path, dist_env):
    from lgtm_ds.training import Trainer

    cfg = load_config(
        None,
        [
            f"output.dir={tmp_path / 'run'}",
            "data.synthetic_examples=300",
            "train.micro_batch_size=8",
            "train.max_steps=3",
            "train.eval_every=0",
            "method.hidden_weight=1.0",
            "output.checkpoint_every=2",
        ],
    )
    tr = Trainer(cfg)
    assert hasattr(tr.student.module, HIDDEN_PROJ)  # widths differ in the embedded pair
    summary = tr.finish(tr.train())
    assert summary["status"] == "completed"
    _, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "run" / "student", output_loading_info=True
    )
    assert not info["unexpected_keys"] and not info["missing_keys"]
    # checkpoints keep them (a resumed run continues training them)
    ckpt = list((tmp_path / "run" / "checkpoints" / "student").glob("step2/*model_states.pt"))
    state = torch.load(ckpt[0], weights_only=False)["module"]
    assert any(k.startswith(HIDDEN_PROJ + ".") for k in state)
