"""The training run: build everything, train with the configured method, evaluate, write outputs.

Everything that can fail on bad input (config, DeepSpeed dicts, data, models) is checked before
the output folder is touched; ``summary.json`` is written last, so a folder without it is not a
finished run. The trainer asks the method (``lgtm_ds.methods``) what it needs and the task
(``lgtm_ds.tasks``) how to build, batch and score; it never branches on their names.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config import ExperimentConfig, config_to_dict, save_resolved
from ..data import GlobalBatches, build_tokenizer, load_task, make_loader, synthetic_corpus_texts
from ..engines.build import build_engines, resolve_ds_configs
from ..engines.deepspeed import all_gather_object, init_distributed
from ..errors import ConfigError
from ..io import write_json_atomic
from ..methods import Distiller, get_method
from ..tasks.base import ModelOptions
from ..tasks.hf import is_embedded
from .checkpoint import load_checkpoint, resolve_resume, restore_rng, save_checkpoint
from .logger import MetricsLogger
from .summary import build_summary, format_summary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def optimizer_steps(
    n_train: int, cfg: ExperimentConfig, world: int, epochs: float
) -> tuple[int, int]:
    """(micro-batches per epoch per rank, optimizer steps in ``epochs``)."""
    batches = n_train // world // cfg.train.micro_batch_size
    steps_per_epoch = batches // cfg.train.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split has {n_train} examples: fewer than one optimizer step of "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x "
            f"gradient_accumulation_steps={cfg.train.gradient_accumulation_steps} x {world} ranks"
        )
    return batches, max(1, math.ceil(epochs * steps_per_epoch))


class Trainer:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.method = get_method(cfg.method.name)
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        seed_everything(cfg.train.seed)
        self.out = Path(cfg.output.dir)
        # -- everything that can fail on bad input, before any output is written ----------------
        self._check_output_dir()
        # a bad resume target must fail before anything in the run folder is touched
        self.resume_from = (
            resolve_resume(cfg.output.resume, self.out) if cfg.output.resume else None
        )
        self.ds_teacher, self.ds_student = resolve_ds_configs(cfg, self.world)
        self._build_data()
        teacher, student = self._build_models()
        self._plan_steps()
        self._build_engines(teacher, student)
        # -- outputs ---------------------------------------------------------------------------
        self.step = 0
        self.stage1_done = 0
        self._write_run_header()
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
            self._resume(*self.resume_from)

    # -- building ---------------------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        out = self.cfg.output
        if (self.out / "summary.json").exists() and not (out.overwrite or out.resume):
            raise ConfigError(
                f"output.dir {str(self.out)!r} already holds a finished run (summary.json); "
                f"set output.overwrite=true or pick another folder"
            )

    def _build_data(self) -> None:
        cfg = self.cfg
        tok_name = cfg.model.tokenizer or (
            "embedded" if is_embedded(cfg.model.teacher) else cfg.model.teacher
        )
        corpus = None
        if tok_name == "embedded" and cfg.data.source == "synthetic":
            corpus = synthetic_corpus_texts(cfg.data.synthetic_examples, cfg.train.seed)
        self.tokenizer = build_tokenizer(tok_name, corpus)
        self.data = load_task(cfg.data, self.tokenizer, cfg.train.seed)
        self.task = self.data.task
        self.collate = self.task.collator(self.tokenizer)

    def _build_models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        m = self.cfg.model
        options = ModelOptions(
            vocab_size=len(self.tokenizer),
            dropout=m.dropout,
            zero_init_head=m.zero_init_classifier,
            seed=self.cfg.train.seed,
        )
        teacher = self.task.build_model(m.teacher, role="teacher", options=options)
        student = self.task.build_model(m.student, role="student", options=options)
        self.task.check_pair(teacher, student, m.teacher, m.student)
        self.n_params = {
            "teacher": sum(p.numel() for p in teacher.parameters()),
            "student": sum(p.numel() for p in student.parameters()),
        }
        return teacher, student

    def _plan_steps(self) -> None:
        cfg, n = self.cfg, len(self.data.train)
        _, steps = optimizer_steps(n, cfg, self.world, cfg.train.epochs)
        self.total_steps = cfg.train.max_steps or steps
        self.stage1_steps = 0
        if self.method.teacher_stage1:
            _, s1 = optimizer_steps(n, cfg, self.world, cfg.method.teacher_stage1_epochs)
            self.stage1_steps = min(s1, cfg.train.max_steps) if cfg.train.max_steps else s1
        # the teacher's schedule spans the steps it learns in
        self.teacher_steps = self.stage1_steps + self.total_steps * self.method.trains_teacher

    def _build_engines(self, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
        cfg = self.cfg
        self.teacher, self.student = build_engines(
            cfg,
            teacher,
            student,
            teacher_steps=self.teacher_steps,
            student_steps=self.total_steps,
            ds_configs=(self.ds_teacher, self.ds_student),
        )
        self.distiller = Distiller.from_config(
            cfg.method, teacher=self.teacher, student=self.student, task=self.task
        )

        def batches(ds):
            return GlobalBatches(
                ds,
                micro_batch_size=cfg.train.micro_batch_size,
                gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                seed=cfg.train.seed,
                rank=self.rank,
                world_size=self.world,
                collate_fn=self.collate,
            )

        self.train_batches = batches(self.data.train)
        # quiz batches: same micro-batch size and accumulation as training batches
        self.quiz_batches = batches(self.data.quiz) if self.method.needs_quiz else None

    def _write_run_header(self) -> None:
        """Rank 0: a clean run folder with the resolved config and the data split."""
        if not self.is_main:
            return
        cfg = self.cfg
        if cfg.output.overwrite and self.out.exists() and not cfg.output.resume:
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "summary.json").unlink(missing_ok=True)
        save_resolved(cfg, self.ds_teacher, self.ds_student, self.out / "config.yaml")
        write_json_atomic(self.out / "data_split.json", self.data.split_record())

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Teacher and student metrics on the eval split (all ranks; rank-sharded, gathered)."""
        n = len(self.data.eval)
        idx = list(range(n))
        per = math.ceil(n / self.world)
        idx += idx[: per * self.world - n]  # pad so every rank runs the same number of batches
        mine = idx[self.rank :: self.world]
        loader = make_loader(
            self.data.eval.select(mine),
            self.cfg.train.eval_batch_size,
            shuffle=False,
            seed=0,
            drop_last=False,
            collate_fn=self.collate,
        )
        labels = np.asarray(self.data.eval["labels"])
        res = {}
        for role, eng in (("teacher", self.teacher), ("student", self.student)):
            eng.module.eval()
            with torch.no_grad():
                preds = np.concatenate([self.task.predictions(eng.forward(b)) for b in loader])
            eng.module.train()
            full = np.zeros((n, *preds.shape[1:]), dtype=preds.dtype)
            for ids, p in all_gather_object((mine, preds)):
                full[np.asarray(ids)] = p
            for k, v in self.task.compute_metrics(full, labels).items():
                res[f"{role}/{k}"] = v
        return res

    # -- training ----------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t0 = time.time()
        self.bar = tqdm(
            total=self.stage1_steps + self.total_steps,
            initial=self.stage1_done + self.step,
            disable=not self.is_main,
            desc=cfg.method.name,
            dynamic_ncols=True,
        )
        self._teacher_stage1()
        history = []
        while self.step < self.total_steps:
            quiz = self.quiz_batches.next() if self.quiz_batches is not None else None
            m = self.distiller.step(self.train_batches.next(), quiz)
            self.step += 1
            self.bar.update(1)
            self._log_step(m)
            last = self.step == self.total_steps
            if last or (cfg.train.eval_every and self.step % cfg.train.eval_every == 0):
                ev = self.evaluate()
                history.append({"step": self.step, **ev})
                self.logger.log({"step": self.step, "eval": True, **ev})
            every = cfg.output.checkpoint_every
            if every and self.step % every == 0 and not last:
                self.save_checkpoint()
        self.bar.close()
        return {"wall_s": time.time() - t0, "history": history}

    def _teacher_stage1(self) -> None:
        """Teacher-only fine-tuning before distillation (methods with ``teacher_stage1``)."""
        while self.stage1_done < self.stage1_steps:
            m = self.distiller.teacher_finetune_step(self.train_batches.next())
            self.stage1_done += 1
            self.bar.update(1)
            if self.stage1_done % self.cfg.train.log_every == 0:
                self.logger.log({"stage": 1, "step": self.stage1_done, **m})
        if self.stage1_steps and self.step == 0:
            self.logger.log({"stage": 1, "step": self.stage1_done, "eval": True, **self.evaluate()})

    def _log_step(self, m: dict) -> None:
        influence = m.pop("influence", None)
        if influence is not None:
            m["influence_mean"] = float(influence.mean())
            m["influence_std"] = float(influence.std()) if influence.numel() > 1 else 0.0
        m["student_lr"] = self.student.lr()
        if self.method.trains_teacher:
            m["teacher_lr"] = self.teacher.lr()
        if self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in m.items() if "loss" in k})
            self.logger.log({"step": self.step, "epoch": self.train_batches.epoch, **m})

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "stage1_done": self.stage1_done,
            "train": self.train_batches.state_dict(),
            "quiz": self.quiz_batches.state_dict() if self.quiz_batches else None,
        }
        save_checkpoint(
            self.out / "checkpoints",
            f"step{self.step}",
            self.teacher,
            self.student,
            state,
            rank=self.rank,
            is_main=self.is_main,
        )

    def _resume(self, root: Path, tag: str) -> None:
        st = load_checkpoint(root, tag, self.teacher, self.student)
        self.step, self.stage1_done = st["step"], st["stage1_done"]
        self.train_batches.load_state_dict(st["train"])
        if self.quiz_batches is not None and st["quiz"]:
            self.quiz_batches.load_state_dict(st["quiz"])
        restore_rng(root, tag, rank=self.rank)  # last: the loaders above draw from the RNG

    # -- final outputs -----------------------------------------------------------------------------
    def finish(self, result: dict) -> dict:
        cfg = self.cfg
        final = result["history"][-1] if result["history"] else self.evaluate()
        self.student.save_pretrained(str(self.out / "student"), self.is_main)
        if cfg.output.save_teacher:
            self.teacher.save_pretrained(str(self.out / "teacher"), self.is_main)
        summary = build_summary(
            cfg,
            task_name=self.data.name,
            primary=self.task.primary_metric,
            steps=self.step,
            stage1_steps=self.stage1_done,
            world=self.world,
            wall_s=result["wall_s"],
            params=self.n_params,
            zero_stage={"teacher": self.teacher.stage, "student": self.student.stage},
            final=final,
            history=result["history"],
        )
        if self.is_main:
            self.tokenizer.save_pretrained(str(self.out / "student"))
            if cfg.output.save_teacher:
                self.tokenizer.save_pretrained(str(self.out / "teacher"))
            text = format_summary(summary, self.out)
            (self.out / "summary.txt").write_text(text)
            write_json_atomic(self.out / "summary.json", summary)  # last: marks the run complete
            print(text, flush=True)
        self.logger.close()
        return summary


def run(cfg: ExperimentConfig) -> dict:
    trainer = Trainer(cfg)
    return trainer.finish(trainer.train())
