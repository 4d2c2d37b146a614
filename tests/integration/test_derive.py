"""A student made from the teacher's layers (``model.student: from_teacher``) through the
trainer: it trains, saves as a plain 2-layer folder, and its model card says how it was made."""

import json

from lgtm_ds.config import load_config


def test_trainer_run_with_a_student_from_the_teachers_layers(tmp_path, dist_env):
    """The embedded 4-layer teacher -> its layers [0, 3], trained by LGTM through the trainer;
    the saved student is a 2-layer model whose first step starts from the teacher's weights."""
    from lgtm_ds.training import run

    cfg = load_config(
        None,
        [
            f"output.dir={tmp_path / 'out'}",
            "data.synthetic_examples=400",
            "train.micro_batch_size=8",
            "train.max_steps=4",
            "train.eval_every=2",
            "model.student=from_teacher",
            "model.student_layers=[0,3]",
        ],
    )
    summary = run(cfg)
    assert summary["status"] == "completed"
    assert summary["params"]["student"] < summary["params"]["teacher"]
    saved = json.loads((tmp_path / "out" / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2
    card = (tmp_path / "out" / "student" / "README.md").read_text()
    assert "layers [0, 3]" in card
