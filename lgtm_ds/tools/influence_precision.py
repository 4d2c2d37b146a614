"""How faithful is the LGTM influence term in bf16? Cosine vs a float64 run of the same step.

Runs LGTM steps of the default embedded teacher/student on synthetic batches three ways:
float64 (reference), bf16 as LGTM-DS does it (perturbed student forwards from fp32 work
tensors), and bf16 with theta +- R v rounded to bf16 (what an in-place bf16 perturbation sees).
Reports the cosine of the logit-space influence term eta a_t (q+ - q-) / (2 R T n) and of the
per-sample influence against float64, and what is left of the term once it is summed into one
bf16 dL/dz tensor (as a single bf16 teacher backward would receive it).

    python launch/influence_precision.py [--steps 3] [--batch 32] [--warm_steps 100]
"""

from __future__ import annotations

import argparse
import copy

import torch

from ..config import load_config
from ..data import InfiniteLoader, build_tokenizer, load_task, make_loader, synthetic_corpus_texts
from ..engines.base import TorchEngine
from ..engines.optim import build_adamw
from ..methods import Distiller
from ..tasks.base import ModelOptions
from ..tasks.classification import ClassificationTask


class RoundedPerturbation(TorchEngine):
    """Sees theta +- R v only after rounding to the model dtype (in-place bf16 perturbation)."""

    def functional_forward(self, params, batch):
        dtype = next(self.module.parameters()).dtype
        return super().functional_forward([p.to(dtype) for p in params], batch)


class RecordingTask(ClassificationTask):
    """Records, per LGTM step, the influence term in float64 and what a bf16 dL/dz keeps of it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen, self.in_grad = [], []

    def lgtm_teacher_pass(self, z, s, s_plus, s_minus, labels, p, *, split=False):
        # (step D's one call per micro-batch; lgtm_logit_grad is not called on its own)
        T = p.temperature
        dq = torch.softmax(s_plus.double() / T, -1) - torch.softmax(s_minus.double() / T, -1)
        term = p.eta * p.alpha_teacher * dq / (2 * p.radius * T * z.shape[0])
        self.seen.append(term.reshape(-1))
        tp = super().lgtm_teacher_pass(z, s, s_plus, s_minus, labels, p, split=split)
        grad = tp.grad if tp.term is None else tp.grad + tp.term  # the whole dL/dz
        # what the teacher backward receives of the term, after dL/dz is cast to z's dtype
        without = (grad.double() - term).to(z.dtype)
        self.in_grad.append((grad.to(z.dtype).double() - without.double()).reshape(-1))
        return tp


def influence(mode, teacher, student, batches, quiz, lrs, num_labels):
    dtype = torch.float64 if mode == "fp64" else torch.bfloat16
    t, s = copy.deepcopy(teacher).to(dtype), copy.deepcopy(student).to(dtype)
    t_opt, s_opt = build_adamw(t, lrs[0], 0.0), build_adamw(s, lrs[1], 0.0)
    s_engine = (RoundedPerturbation if mode == "bf16_rounded" else TorchEngine)(s, s_opt)
    task = RecordingTask(num_labels=num_labels)
    d = Distiller("lgtm", teacher=t, student=s_engine, teacher_optimizer=t_opt, task=task)
    infl = [d.step(b, q)["influence"].double() for b, q in zip(batches, quiz)]
    if not task.seen:
        raise RuntimeError("the LGTM step never called Task.lgtm_teacher_pass: nothing recorded")
    return torch.cat(task.seen), torch.cat(infl), torch.cat(task.in_grad)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--warm_steps",
        type=int,
        default=100,
        help="online-KD steps (fp32) before measuring, so that biases and norms "
        "move off their exact initial values (zero biases absorb any R v)",
    )
    args = ap.parse_args(argv)
    cfg = load_config(None, ["model.dropout=0.0"])
    seed, lrs = cfg.train.seed, (cfg.train.teacher_lr, cfg.train.student_lr)
    tok = build_tokenizer("embedded", synthetic_corpus_texts(cfg.data.synthetic_examples, seed))
    data = load_task(cfg.data, tok, seed)
    options = ModelOptions(vocab_size=len(tok), dropout=0.0, seed=seed)
    teacher = data.task.build_model(cfg.model.teacher, role="teacher", options=options)
    student = data.task.build_model(cfg.model.student, role="student", options=options)
    collate = data.task.collator(tok)

    def batches(ds, seed):
        loader = make_loader(
            ds, args.batch, shuffle=True, seed=seed, drop_last=True, collate_fn=collate
        )
        return InfiniteLoader(loader)

    tr, qz = batches(data.train, 1), batches(data.quiz, 2)
    if args.warm_steps:
        warm = Distiller(
            "online_kd",
            teacher=teacher,
            student=student,
            teacher_optimizer=build_adamw(teacher, lrs[0], 0.0),
            student_optimizer=build_adamw(student, lrs[1], 0.0),
        )
        for _ in range(args.warm_steps):
            warm.step(next(tr))
    train_b = [next(tr) for _ in range(args.steps)]
    quiz_b = [next(qz) for _ in range(args.steps)]
    n = data.num_labels
    ref_term, ref_infl, _ = influence("fp64", teacher, student, train_b, quiz_b, lrs, n)
    print(
        f"default models: teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M, "
        f"student {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params; "
        f"{args.warm_steps} warm-up online-KD steps, then {args.steps} LGTM steps, "
        f"batch {args.batch}"
    )
    cos = torch.nn.functional.cosine_similarity
    labels = {
        "bf16": "bf16, LGTM-DS (fp32 work tensors)",
        "bf16_rounded": "bf16, theta +- Rv rounded to bf16",
    }
    for mode, label in labels.items():
        term, infl, in_grad = influence(mode, teacher, student, train_b, quiz_b, lrs, n)
        print(
            f"{label:<36} cosine vs fp64: influence term "
            f"{float(cos(term, ref_term, dim=0)):.4f}, per-sample influence "
            f"{float(cos(infl, ref_infl, dim=0)):.4f}; the term inside one bf16 dL/dz "
            f"{float(cos(in_grad, ref_term, dim=0)):.4f}"
        )
    print(
        "(the last figure is why bf16 DeepSpeed teachers backpropagate the influence term on "
        "its own and add it to fp32-accumulated gradients: "
        "tests/integration/test_ds_equivalence.py)"
    )
    return 0
