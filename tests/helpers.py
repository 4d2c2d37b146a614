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


def make_distiller(
    method="lgtm", teacher=None, student=None, *, lrs=(1e-3, 1e-3), wd=0.0, schedule=None, **kw
):
    """A ``Distiller`` over two plain modules, each with a fresh client AdamW (``lrs``: the
    teacher's and the student's learning rates, ``wd`` both weight decays; ``schedule``:
    ``(steps, warmup_ratio)`` of a warmup-linear schedule on both, else none); ``kw``: the other
    ``Distiller`` keywords (hyper-parameters, task, accumulation, ...). The tests' usual pair;
    also the ``make_distiller`` fixture, and the DeepSpeed workers' plain-module reference."""
    from lgtm_ds import Distiller
    from lgtm_ds.engines.optim import build_adamw, warmup_linear

    opts = [build_adamw(m, lr, wd) for m, lr in ((teacher, lrs[0]), (student, lrs[1]))]
    if schedule is not None:
        kw["teacher_scheduler"] = warmup_linear(opts[0], *schedule)
        kw["student_scheduler"] = warmup_linear(opts[1], *schedule)
    return Distiller(
        method,
        teacher=teacher,
        student=student,
        teacher_optimizer=opts[0],
        student_optimizer=opts[1],
        **kw,
    )


def worker_results(tmp_path_factory, script: str, *args: str):
    """Body of a module fixture: ``tests/<script>`` under the deepspeed launcher on 1 and then 2
    ranks, each writing ``<case>.w<ranks>.pt`` into one temporary folder; yields
    ``load(case, world)`` and removes the folder after the module."""
    import shutil

    out = tmp_path_factory.mktemp(script.removesuffix(".py"))
    for ranks in (1, 2):
        proc = run_deepspeed(os.path.join(ROOT, "tests", script), ["--out", str(out), *args], ranks)
        # a non-zero exit here was once an abort at interpreter exit ("terminate called without
        # an active exception"); the workers tear the process group down (shutdown_distributed)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield lambda case, world: torch.load(out / f"{case}.w{world}.pt")
    shutil.rmtree(out, ignore_errors=True)
