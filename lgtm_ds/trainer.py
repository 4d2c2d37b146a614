"""The training run: build everything, train with one of the methods, evaluate, write outputs.

Everything that can fail on bad input (config, DeepSpeed JSON, data, models) is checked before
the output folder is touched; ``summary.json`` is written last, so a folder without it is not a
finished run.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import data as data_lib
from .algorithm import Distiller
from .config import ExperimentConfig, build_ds_config, config_to_dict, save_resolved
from .ds_engine import build_engine, init_distributed
from .errors import ConfigError
from .logger import MetricsLogger
from .metrics import compute_metrics, primary_metric
from .models import build_model, check_pair
from .optim import build_adamw, warmup_linear


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_output_dir(cfg: ExperimentConfig) -> Path:
    out = Path(cfg.output.dir)
    if (out / "summary.json").exists() and not (cfg.output.overwrite or cfg.output.resume):
        raise ConfigError(
            f"output.dir {str(out)!r} already holds a finished run (summary.json); "
            f"set output.overwrite=true or pick another folder"
        )
    return out


def _resolve_resume(cfg: ExperimentConfig, out: Path) -> tuple[Path, str]:
    """(checkpoints root, tag) of ``output.resume``: "auto" (latest under output.dir) or a
    checkpoint folder ``.../checkpoints/<tag>``."""
    where = cfg.output.resume
    if where == "auto":
        root = out / "checkpoints"
        if not (root / "latest").exists():
            raise ConfigError(f"output.resume=auto: no finished checkpoint under {root}")
        tag = (root / "latest").read_text().strip()
    else:
        root, tag = Path(where).parent, Path(where).name
    if not (root / tag / "trainer_state.json").exists():
        raise ConfigError(
            f"output.resume: {root / tag} is not a checkpoint folder (no trainer_state.json)"
        )
    return root, tag


def _tokenizer_name(cfg: ExperimentConfig) -> str:
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    return "embedded" if cfg.model.teacher.startswith("embedded:") else cfg.model.teacher


def _steps(n_train: int, cfg: ExperimentConfig, world: int, epochs: float) -> tuple[int, int]:
    """(batches per epoch per rank, optimizer steps for ``epochs``)."""
    per_rank = n_train // world
    batches = per_rank // cfg.train.micro_batch_size
    steps_per_epoch = batches // cfg.train.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split has {n_train} examples: fewer than one optimizer step of "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x "
            f"gradient_accumulation_steps={cfg.train.gradient_accumulation_steps} x {world} ranks"
        )
    return batches, max(1, math.ceil(epochs * steps_per_epoch))


class _Batches:
    """Global-batch iterator: lists of ``gradient_accumulation_steps`` micro-batches, epoch after
    epoch, deterministic in (seed, epoch), resumable by (epoch, position)."""

    def __init__(self, ds, cfg: ExperimentConfig, rank: int, world: int, pad_id: int):
        self.loader = data_lib.make_loader(
            ds,
            cfg.train.micro_batch_size,
            shuffle=True,
            seed=cfg.train.seed,
            rank=rank,
            world_size=world,
            drop_last=True,
            pad_token_id=pad_id,
        )
        self.gas = cfg.train.gradient_accumulation_steps
        self.inner = data_lib.InfiniteLoader(self.loader)

    def next(self) -> list[dict]:
        # a global batch never straddles two epochs' tails: drop the incomplete remainder
        if len(self.loader) - self.inner.position < self.gas and self.inner.position > 0:
            self.inner.load_state_dict({"epoch": self.inner.epoch + 1, "position": 0})
        return [next(self.inner) for _ in range(self.gas)]

    @property
    def epoch(self) -> int:
        return self.inner.epoch


class Trainer:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        seed_everything(cfg.train.seed)
        self.out = _check_output_dir(cfg)
        # a bad resume target must fail before anything in the run folder is touched
        self.resume_from = _resolve_resume(cfg, self.out) if cfg.output.resume else None

        # -- everything that can fail on bad input, before any output is written ----------------
        self.ds_teacher = build_ds_config(cfg, "teacher", self.world)
        self.ds_student = build_ds_config(cfg, "student", self.world)
        s_stage = self.ds_student.get("zero_optimization", {}).get("stage", 0)
        if cfg.method.name == "lgtm" and s_stage == 3 and cfg.train.precision != "fp32":
            raise ConfigError(
                f"method lgtm with a ZeRO-3 student needs train.precision=fp32 (got "
                f"{cfg.train.precision}): its shards would round theta +- R v and lose the "
                f"perturbation; use deepspeed.student.zero_optimization.stage<=2 for bf16/fp16"
            )
        if cfg.method.name == "lgtm" and cfg.train.precision == "fp16":
            raise ConfigError(
                "method lgtm with train.precision=fp16 is not supported yet: the influence part of "
                "the teacher gradient (~1e-5 of the rest) is below fp16 resolution and the "
                "fp32-accumulation path is bf16-only; use bf16 or fp32 (the baselines run in fp16)"
            )
        if cfg.method.name == "lgtm" and cfg.train.precision == "bf16":
            fp32_teacher_grads_(self.ds_teacher)
        tok_name = _tokenizer_name(cfg)
        corpus = (
            data_lib.synthetic_corpus_texts(cfg.data, cfg.train.seed)
            if tok_name == "embedded" and cfg.data.source == "synthetic"
            else None
        )
        self.tokenizer = data_lib.build_tokenizer(tok_name, corpus)
        self.task = data_lib.load_task(cfg.data, self.tokenizer, cfg.train.seed)
        kw = dict(
            num_labels=self.task.num_labels,
            vocab_size=len(self.tokenizer),
            dropout=cfg.model.dropout,
            zero_init_classifier=cfg.model.zero_init_classifier,
            is_regression=self.task.is_regression,
        )
        teacher = build_model(cfg.model.teacher, role="teacher", **kw)
        student = build_model(cfg.model.student, role="student", **kw)
        check_pair(teacher, student, cfg.model.teacher, cfg.model.student)
        self.n_params = {
            "teacher": sum(p.numel() for p in teacher.parameters()),
            "student": sum(p.numel() for p in student.parameters()),
        }

        self.batches_per_epoch, self.total_steps = _steps(
            len(self.task.train), cfg, self.world, cfg.train.epochs
        )
        if cfg.train.max_steps:
            self.total_steps = cfg.train.max_steps
        self.stage1_steps = 0
        if cfg.method.name == "vanilla_kd":
            _, self.stage1_steps = _steps(
                len(self.task.train), cfg, self.world, cfg.method.teacher_stage1_epochs
            )
            if cfg.train.max_steps:
                self.stage1_steps = min(self.stage1_steps, cfg.train.max_steps)
        teacher_steps = self.stage1_steps if cfg.method.name == "vanilla_kd" else self.total_steps

        t_opt = build_adamw(teacher, cfg.train.teacher_lr, cfg.train.weight_decay)
        s_opt = build_adamw(student, cfg.train.student_lr, cfg.train.weight_decay)
        self.teacher = build_engine(
            teacher,
            t_opt,
            warmup_linear(t_opt, max(teacher_steps, 1), cfg.train.warmup_ratio),
            self.ds_teacher,
            "teacher",
        )
        self.student = build_engine(
            student,
            s_opt,
            warmup_linear(s_opt, self.total_steps, cfg.train.warmup_ratio),
            self.ds_student,
            "student",
        )
        m = cfg.method
        self.distiller = Distiller(
            m.name,
            teacher=self.teacher,
            student=self.student,
            alpha_student=m.alpha_student,
            alpha_teacher=m.alpha_teacher,
            temperature=m.temperature,
            fd_radius=m.fd_radius,
            scale_by_t2=m.scale_by_t2,
        )
        pad = self.tokenizer.pad_token_id or 0
        self.train_batches = _Batches(self.task.train, cfg, self.rank, self.world, pad)
        # quiz batches: same micro-batch size and accumulation as training batches
        self.quiz_batches = (
            _Batches(self.task.quiz, cfg, self.rank, self.world, pad) if m.name == "lgtm" else None
        )
        self.pad = pad
        self.step = 0
        self.stage1_done = 0

        # -- outputs ---------------------------------------------------------------------------
        if self.is_main:
            if cfg.output.overwrite and self.out.exists() and not cfg.output.resume:
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "summary.json").unlink(missing_ok=True)
            save_resolved(cfg, self.ds_teacher, self.ds_student, self.out / "config.yaml")
            _write_json(
                self.out / "data_split.json",
                {
                    "task": self.task.name,
                    "quiz_source": self.task.quiz_source,
                    "quiz_indices": self.task.quiz_indices,
                    "eval_indices": self.task.eval_indices,
                    "n_train": len(self.task.train),
                    "n_quiz": len(self.task.quiz),
                    "n_eval": len(self.task.eval),
                },
            )
        self.logger = MetricsLogger(
            self.out / "metrics.jsonl",
            enabled=self.is_main,
            wandb=cfg.output.wandb,
            project=cfg.output.wandb_project,
            run_name=cfg.output.run_name or self.out.name,
            config=config_to_dict(cfg),
            resume=bool(cfg.output.resume),
        )
        if self.resume_from is not None:
            self._resume(self.resume_from)

    # ------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Teacher and student metrics on the eval split (all ranks; rank-sharded, gathered)."""
        import deepspeed.comm as dist

        n = len(self.task.eval)
        idx = list(range(n))
        per = math.ceil(n / self.world)
        idx += idx[: per * self.world - n]  # pad so every rank runs the same number of batches
        mine = idx[self.rank :: self.world]
        loader = data_lib.make_loader(
            self.task.eval.select(mine),
            self.cfg.train.eval_batch_size,
            shuffle=False,
            seed=0,
            drop_last=False,
            pad_token_id=self.pad,
        )
        res = {}
        labels = np.asarray(self.task.eval["labels"])
        for role, eng in (("teacher", self.teacher), ("student", self.student)):
            eng.module.eval()
            logits = []
            with torch.no_grad():
                for b in loader:
                    logits.append(eng.forward(b).float().cpu())
            eng.module.train()
            mine_logits = torch.cat(logits).numpy()
            gathered = [None] * self.world
            if self.world > 1:
                dist.all_gather_object(gathered, (mine, mine_logits))
            else:
                gathered = [(mine, mine_logits)]
            preds = np.zeros((n, mine_logits.shape[-1]), dtype=np.float32)
            for ids, lg in gathered:
                preds[np.asarray(ids)] = lg
            for k, v in compute_metrics(self.task.metric_names, preds, labels).items():
                res[f"{role}/{k}"] = v
        return res

    def train(self) -> dict:
        cfg = self.cfg
        t0 = time.time()
        from tqdm.auto import tqdm

        total = self.stage1_steps + self.total_steps
        bar = tqdm(
            total=total,
            initial=self.stage1_done + self.step,
            disable=not self.is_main,
            desc=cfg.method.name,
            dynamic_ncols=True,
        )
        # vanilla KD stage 1: the teacher alone
        while self.stage1_done < self.stage1_steps:
            m = self.distiller.teacher_finetune_step(self.train_batches.next())
            self.stage1_done += 1
            bar.update(1)
            if self.stage1_done % cfg.train.log_every == 0:
                self.logger.log({"stage": 1, "step": self.stage1_done, **m})
        if self.stage1_steps and self.step == 0:
            self.logger.log({"stage": 1, "step": self.stage1_done, "eval": True, **self.evaluate()})
        history = []
        while self.step < self.total_steps:
            quiz = self.quiz_batches.next() if self.quiz_batches is not None else None
            m = self.distiller.step(self.train_batches.next(), quiz)
            self.step += 1
            bar.update(1)
            influence = m.pop("influence", None)
            if influence is not None:
                m["influence_mean"] = float(influence.mean())
                m["influence_std"] = float(influence.std()) if influence.numel() > 1 else 0.0
            m["student_lr"] = self.student.lr()
            if cfg.method.name != "vanilla_kd":
                m["teacher_lr"] = self.teacher.lr()
            if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                bar.set_postfix({k: f"{v:.3g}" for k, v in m.items() if "loss" in k})
                self.logger.log({"step": self.step, "epoch": self.train_batches.epoch, **m})
            if (
                cfg.train.eval_every and self.step % cfg.train.eval_every == 0
            ) or self.step == self.total_steps:
                ev = self.evaluate()
                history.append({"step": self.step, **ev})
                self.logger.log({"step": self.step, "eval": True, **ev})
            if (
                cfg.output.checkpoint_every
                and self.step % cfg.output.checkpoint_every == 0
                and self.step < self.total_steps
            ):
                self.save_checkpoint()
        bar.close()
        return {"wall_s": time.time() - t0, "history": history}

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        tag = f"step{self.step}"
        root = self.out / "checkpoints"
        self.teacher.save_checkpoint(str(root / "teacher"), tag)
        self.student.save_checkpoint(str(root / "student"), tag)
        (root / tag).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            root / tag / f"rng_rank{self.rank}.pt",
        )  # dropout streams differ per rank
        if self.is_main:
            _write_json(
                root / tag / "trainer_state.json",
                {
                    "step": self.step,
                    "stage1_done": self.stage1_done,
                    "train": self.train_batches.inner.state_dict(),
                    "quiz": self.quiz_batches.inner.state_dict() if self.quiz_batches else None,
                },
            )
        _barrier()
        if self.is_main:
            (root / "latest").write_text(tag)  # last: a checkpoint named here is complete

    def _resume(self, where: tuple[Path, str]) -> None:
        root, tag = where
        state_file = root / tag / "trainer_state.json"
        self.teacher.load_checkpoint(str(root / "teacher"), tag)
        self.student.load_checkpoint(str(root / "student"), tag)
        st = json.loads(state_file.read_text())
        self.step, self.stage1_done = st["step"], st["stage1_done"]
        self.train_batches.inner.load_state_dict(st["train"])
        if self.quiz_batches is not None and st["quiz"]:
            self.quiz_batches.inner.load_state_dict(st["quiz"])
        rng_file = root / tag / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file)
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # -- final outputs ---------------------------------------------------------------------------
    def finish(self, result: dict) -> dict:
        cfg = self.cfg
        final = result["history"][-1] if result["history"] else self.evaluate()
        self.student.save_pretrained(str(self.out / "student"), self.is_main)
        if cfg.output.save_teacher:
            self.teacher.save_pretrained(str(self.out / "teacher"), self.is_main)
        summary = {
            "method": cfg.method.name,
            "task": self.task.name,
            "steps": self.step,
            "stage1_steps": self.stage1_done,
            "world_size": self.world,
            "wall_s": round(result["wall_s"], 2),
            "params": self.n_params,
            "zero_stage": {"teacher": self.teacher.stage, "student": self.student.stage},
            "precision": cfg.train.precision,
            "primary_metric": primary_metric(self.task.metric_names),
            "final": {k: v for k, v in final.items() if k != "step"},
            "best_student": max(
                (h[f"student/{primary_metric(self.task.metric_names)}"] for h in result["history"]),
                default=None,
            ),
        }
        if self.is_main:
            self.tokenizer.save_pretrained(str(self.out / "student"))
            if cfg.output.save_teacher:
                self.tokenizer.save_pretrained(str(self.out / "teacher"))
            text = format_summary(summary, self.out)
            (self.out / "summary.txt").write_text(text)
            _write_json(self.out / "summary.json", summary)  # last: marks the run complete
            print(text, flush=True)
        self.logger.close()
        return summary


def format_summary(s: dict, out: Path) -> str:
    pm = s["primary_metric"]
    lines = [
        "=" * 64,
        f"LGTM-DS run: {s['method']} on {s['task']} ({s['steps']} steps"
        + (f" + {s['stage1_steps']} teacher stage-1 steps" if s["stage1_steps"] else "")
        + f", {s['world_size']} rank(s), {s['precision']})",
        f"teacher {s['params']['teacher'] / 1e6:.2f}M params (ZeRO-{s['zero_stage']['teacher']})"
        f"  ->  student {s['params']['student'] / 1e6:.2f}M params "
        f"(ZeRO-{s['zero_stage']['student']})",
        f"wall time {s['wall_s']:.1f} s",
        "final eval: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(s["final"].items())),
        f"best student {pm}: {s['best_student']:.4f}" if s["best_student"] is not None else "",
        f"outputs: {out}/ (config.yaml, metrics.jsonl, data_split.json, student/, "
        + ("teacher/, " if (out / "teacher").exists() else "")
        + "summary.json)",
        "=" * 64,
    ]
    return "\n".join(line for line in lines if line)


def fp32_teacher_grads_(ds_teacher: dict) -> None:
    """Make a teacher DeepSpeed dict fit for bf16 LGTM (in place).

    The influence part of the teacher gradient is ~1e-5 of the rest and vanishes in bf16
    gradients; it is backpropagated on its own and added to fp32-accumulated gradients, which
    DeepSpeed offers at ZeRO-2/3 with ``data_types.grad_accum_dtype = fp32``."""
    stage = ds_teacher.get("zero_optimization", {}).get("stage", 0)
    if stage < 2:
        raise ConfigError(
            f"method lgtm with train.precision=bf16 needs the teacher at ZeRO stage 2 or 3 (got "
            f"{stage}; deepspeed.teacher.zero_optimization.stage): at stage 0/1 DeepSpeed keeps "
            f"bf16 gradients, which round the influence term away"
        )
    data_types = ds_teacher.setdefault("data_types", {})
    if data_types.get("grad_accum_dtype", "fp32") != "fp32":
        raise ConfigError(
            f"method lgtm with bf16 needs the teacher's data_types.grad_accum_dtype = fp32, got "
            f"{data_types['grad_accum_dtype']!r}"
        )
    data_types["grad_accum_dtype"] = "fp32"


def _barrier() -> None:
    import deepspeed.comm as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run(cfg: ExperimentConfig) -> dict:
    trainer = Trainer(cfg)
    return trainer.finish(trainer.train())
