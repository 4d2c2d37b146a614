"""launch/bench_step.py runs each method in a child process and appends one CSV row each."""

import pytest


@pytest.mark.parametrize(
    "name,billions,tied", [("llama-1b", 1.236, True), ("llama-125m", 0.1305, True)]
)
def test_gpu_decoder_preset_models_have_the_documented_size(name, billions, tied):
    """The decoder-1b preset (the GPU shape): a Llama-3.2-1B-shaped 1.24B teacher and a ~0.13B
    student at V = 128256 with 1024 positions (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lgtm_ds.tasks import hf
    from lgtm_ds.tasks.base import ModelOptions
    from lgtm_ds.tools.bench_step import PRESETS

    assert PRESETS["decoder-1b"][1:] == (
        "embedded:llama-1b",
        "embedded:llama-125m",
        8,
        1024,
        128256,
    )
    cfg = hf.embedded_decoder_config(
        name, options=ModelOptions(vocab_size=128256), max_position=1024
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert n == pytest.approx(billions, rel=1e-3) and cfg.tie_word_embeddings == tied
    assert cfg.max_position_embeddings == 1024


@pytest.mark.slow
def test_influence_precision_tool_reports_the_cosines(capsys):
    """``launch/influence_precision.py`` (a GPU-check step) on one tiny step: it records the
    term through the task's step-D call (0.8 moved step D to ``lgtm_teacher_pass``, and the tool
    recorded nothing until 0.9) and LGTM-DS's bf16 influence term tracks float64."""
    import re

    from lgtm_ds.tools.influence_precision import main

    assert main(["--steps", "1", "--batch", "8", "--warm_steps", "0"]) == 0
    out = capsys.readouterr().out
    got = re.search(r"fp32 work tensors\)\s+cosine vs fp64: influence term ([0-9.]+)", out)
    assert got, out
    assert float(got.group(1)) >= 0.99
