"""How faithful is the LGTM influence term in bf16? Cosine vs a float64 run of the same step.

Runs one LGTM step of the default embedded teacher/student on synthetic batches three ways:
float64 (reference), bf16 as LGTM-DS does it (perturbed student forwards from fp32 work
tensors), and bf16 with theta +- R v rounded to bf16 (what an in-place bf16 perturbation sees).
Reports the cosine of the logit-space influence term eta a_t (q+ - q-) / (2 R T n) and of the
per-sample influence against float64, and what is left of the term once it is summed into one
bf16 dL/dz tensor (as a single bf16 teacher backward would receive it).

    python launch/influence_precision.py [--steps 3] [--batch 32]
"""

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lgtm_ds import Distiller, TorchEngine, losses  # noqa: E402
from lgtm_ds import data as data_lib  # noqa: E402
from lgtm_ds.config import load_config  # noqa: E402
from lgtm_ds.models import build_model  # noqa: E402
from lgtm_ds.optim import build_adamw  # noqa: E402


class RoundedPerturbation(TorchEngine):
    """Sees theta +- R v only after rounding to the model dtype (in-place bf16 perturbation)."""

    def functional_forward(self, params, batch):
        dtype = next(self.module.parameters()).dtype
        return super().functional_forward([p.to(dtype) for p in params], batch)


def influence(mode, teacher, student, batches, quiz, args):
    dtype = torch.float64 if mode == "fp64" else torch.bfloat16
    t, s = copy.deepcopy(teacher).to(dtype), copy.deepcopy(student).to(dtype)
    t_opt, s_opt = build_adamw(t, args.teacher_lr, 0.0), build_adamw(s, args.student_lr, 0.0)
    s_engine = (RoundedPerturbation if mode == "bf16_rounded" else TorchEngine)(s, s_opt)
    d = Distiller("lgtm", teacher=t, student=s_engine, teacher_optimizer=t_opt)
    seen, in_grad = [], []
    orig = losses.lgtm_teacher_logit_grad

    def spy(z, s_logits, s_plus, s_minus, labels, **kw):
        q = torch.softmax(s_plus.double() / kw["temperature"], -1) - torch.softmax(
            s_minus.double() / kw["temperature"], -1
        )
        term = (
            kw["eta"]
            * kw["alpha_teacher"]
            * q
            / (2 * kw["radius"] * kw["temperature"] * z.shape[0])
        )
        seen.append(term.reshape(-1))
        grad, infl = orig(z, s_logits, s_plus, s_minus, labels, **kw)
        # what the teacher backward receives of the term, after dL/dz is cast to z's dtype
        without = (grad.double() - term).to(z.dtype)
        in_grad.append((grad.to(z.dtype).double() - without.double()).reshape(-1))
        return grad, infl

    losses.lgtm_teacher_logit_grad = spy
    infl = []
    try:
        for b, q in zip(batches, quiz):
            infl.append(d.step(b, q)["influence"].double())
    finally:
        losses.lgtm_teacher_logit_grad = orig
    return torch.cat(seen), torch.cat(infl), torch.cat(in_grad)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--warm_steps",
        type=int,
        default=100,
        help="online-KD steps (fp32) before measuring, so that biases and norms "
        "move off their exact initial values (zero biases absorb any R v)",
    )
    args = ap.parse_args()
    cfg = load_config(None)
    args.teacher_lr, args.student_lr = cfg.train.teacher_lr, cfg.train.student_lr
    tok = data_lib.build_tokenizer("embedded", data_lib.synthetic_corpus_texts(cfg.data, 42))
    task = data_lib.load_task(cfg.data, tok, 42)
    kw = dict(
        num_labels=task.num_labels, vocab_size=len(tok), dropout=0.0, zero_init_classifier=False
    )
    teacher = build_model(cfg.model.teacher, role="teacher", **kw)
    student = build_model(cfg.model.student, role="student", **kw)

    def mk(ds, seed):
        loader = data_lib.make_loader(
            ds, args.batch, shuffle=True, seed=seed, drop_last=True, pad_token_id=0
        )
        return data_lib.InfiniteLoader(loader)

    tr, qz = mk(task.train, 1), mk(task.quiz, 2)
    if args.warm_steps:
        warm = Distiller(
            "online_kd",
            teacher=teacher,
            student=student,
            teacher_optimizer=build_adamw(teacher, args.teacher_lr, 0.0),
            student_optimizer=build_adamw(student, args.student_lr, 0.0),
        )
        for _ in range(args.warm_steps):
            warm.step(next(tr))
    batches = [next(tr) for _ in range(args.steps)]
    quiz = [next(qz) for _ in range(args.steps)]
    ref_term, ref_infl, _ = influence("fp64", teacher, student, batches, quiz, args)
    print(
        f"default models: teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M, "
        f"student {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params; "
        f"{args.warm_steps} warm-up online-KD steps, then {args.steps} LGTM steps, "
        f"batch {args.batch}"
    )
    cos = torch.nn.functional.cosine_similarity
    for mode in ("bf16", "bf16_rounded"):
        term, infl, in_grad = influence(mode, teacher, student, batches, quiz, args)
        label = (
            "bf16, LGTM-DS (fp32 work tensors)"
            if mode == "bf16"
            else "bf16, theta +- Rv rounded to bf16"
        )
        print(
            f"{label:<36} cosine vs fp64: influence term "
            f"{float(cos(term, ref_term, dim=0)):.4f}, per-sample influence "
            f"{float(cos(infl, ref_infl, dim=0)):.4f}; the term inside one bf16 dL/dz "
            f"{float(cos(in_grad, ref_term, dim=0)):.4f}"
        )
    print(
        "(the last figure is why bf16 DeepSpeed teachers backpropagate the influence term on "
        "its own and add it to fp32-accumulated gradients: tests/test_ds_equivalence.py)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
