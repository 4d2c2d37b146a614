"""Tiny models, random batches and launch helpers shared by the tests."""

import os

import torch
from transformers import AutoModelForSequenceClassification

from lgtm_ds.tasks.hf import embedded_bert_config

VOCAB, LABELS = 61, 3


def tiny_model(dtype=torch.float32, seed=0, size="tiny", num_labels=LABELS):
    torch.manual_seed(seed)
    cfg = embedded_bert_config(size, vocab_size=VOCAB, num_labels=num_labels, dropout=0.0)
    m = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    # fresh, non-zero classifier: a zero head makes several gradients vanish (tests need no zeros)
    torch.nn.init.normal_(m.classifier.weight, std=0.3)
    torch.nn.init.normal_(m.classifier.bias, std=0.1)
    return m.to(dtype)


def random_batch(n, seed, length=11, regression=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, length - 3 :] = 0  # some padding
    return {
        "input_ids": torch.randint(5, VOCAB, (n, length), generator=g),
        "attention_mask": mask,
        "labels": (
            torch.rand(n, generator=g) * 5
            if regression
            else torch.randint(0, LABELS, (n,), generator=g)
        ),
    }


LM_VOCAB = 53


def tiny_decoder(name="gpt2-student", seed=0, dtype=torch.float32, vocab=LM_VOCAB):
    """An embedded decoder (``lgtm_ds.tasks.hf.EMBEDDED_DECODERS``), dropout 0."""
    from lgtm_ds.tasks import get_task
    from lgtm_ds.tasks.base import ModelOptions

    opts = ModelOptions(vocab_size=vocab, dropout=0.0, seed=seed, pad_token_id=0)
    return (
        get_task("causal_lm")()
        .build_model(f"embedded:{name}", role="teacher", options=opts)
        .to(dtype)
    )


def lm_batch(n, seed, length=13, vocab=LM_VOCAB):
    """Causal-LM batch: sequences of different lengths (right padding), a prompt of 1-4 tokens
    masked with -100, padding masked; every sequence keeps at least 2 loss tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    labels = ids.clone()
    for i in range(n):
        L = int(torch.randint(7, length + 1, (1,), generator=g))
        prompt = int(torch.randint(1, 5, (1,), generator=g))
        mask[i, L:] = 0
        ids[i, L:] = 0
        labels[i, L:] = -100
        labels[i, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def free_port() -> int:
    """A TCP port nobody listens on now (rendezvous of launched ranks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_env() -> dict:
    """This process's environment without rank variables, with the repo on PYTHONPATH."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_deepspeed(script: str, args: list[str], ranks: int, timeout: int = 900):
    """``deepspeed --num_gpus ranks script args`` (CPU ranks here), on a free port."""
    import subprocess
    import sys

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port),
        script,
        *args,
    ]
    out = subprocess.run(
        cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert not leaked_shm_buffers(port), leaked_shm_buffers(port)
    return out


def leaked_shm_buffers(port: int) -> list[str]:
    """DeepSpeed CPU all-reduce buffers of the group on ``port`` still in /dev/shm (66 MB of RAM
    each; ``init_distributed`` unlinks them once every rank has mapped them)."""
    import glob

    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def capture_grads(opt, params):
    """Record the gradient of ``params`` each ``opt.step()`` applies (a list per step)."""
    record = []
    orig = opt.step

    def step(*a, **k):
        record.append([p.grad.detach().clone() for p in params])
        return orig(*a, **k)

    opt.step = step
    return record


def make_distiller(method="lgtm", teacher=None, student=None, *, lrs=(1e-3, 1e-3), wd=0.0, **kw):
    """A ``Distiller`` over two plain modules, each with a fresh client AdamW (``lrs``: the
    teacher's and the student's learning rates, ``wd`` both weight decays); ``kw``: the other
    ``Distiller`` keywords (hyper-parameters, task, accumulation, ...). The tests' usual pair;
    also the ``make_distiller`` fixture."""
    from lgtm_ds import Distiller
    from lgtm_ds.engines.optim import build_adamw

    return Distiller(
        method,
        teacher=teacher,
        student=student,
        teacher_optimizer=build_adamw(teacher, lrs[0], wd),
        student_optimizer=build_adamw(student, lrs[1], wd),
        **kw,
    )
