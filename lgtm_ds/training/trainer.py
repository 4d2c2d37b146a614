"""The training run: build everything, train with the configured method, evaluate, write outputs.

Everything that can fail on bad input (config, DeepSpeed dicts, data, models) is checked before
the output folder is touched; ``summary.json`` is written last, so a folder without it is not a
finished run. The trainer asks the method (``lgtm_ds.methods``) what it needs and the task
(``lgtm_ds.tasks``) how to build, batch and score; it never branches on their names.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import ExperimentConfig, config_to_dict, save_resolved
from ..data import (
    GlobalBatches,
    build_tokenizer,
    load_task,
    own_tokenizer,
    synthetic_texts,
)
from ..data.sources import GLUE_DATASET_ID, GLUE_TASKS, check_files
from ..engines.build import build_engines, resolve_ds_configs
from ..engines.dist import (
    all_gather_object,
    check_master_port,
    env_rank_world,
    init_distributed,
)
from ..engines.head import FullLogitsWarning
from ..errors import ConfigError, TrainingError
from ..hub import check_sources
from ..io import atomic_write_text, write_json_atomic
from ..methods import Distiller, get_method
from ..methods.hidden import HIDDEN_PROJ, HiddenSpec, attach_projection
from ..tasks import get_task, task_for_labels
from ..tasks.adapters import apply_adapters, param_counts, peft_wrapper
from ..tasks.base import ModelOptions
from ..tasks.derive import FROM_TEACHER, derive_student
from ..tasks.hf import init_seed, is_embedded
from ..tasks.rollout import check_generation_tokens, check_prompt_room
from . import signals
from .checkpoint import (
    check_run_folder,
    describe_tag,
    load_checkpoint,
    prepare_run_folder,
    restore_rng,
    resume_target,
    save_checkpoint,
)
from .evaluator import Evaluator
from .logger import MetricsLogger
from .loss_guard import LossSpikeGuard
from .model_card import model_card
from .rollouts import write_generations
from .runlock import RunLock, holder_text
from .summary import build_summary, format_summary
from .telemetry import FILE as INFLUENCE_FILE
from .telemetry import InfluenceLog


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
    """One run: everything is built (and every input checked) in ``__init__``, before the run
    folder is touched; :meth:`train` runs the loop and calls the components (the
    :class:`Evaluator`, the checkpoints, the loggers); :meth:`finish` writes the outputs."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.method = get_method(cfg.method.name)
        self.out = Path(cfg.output.dir)
        # -- everything that can fail on bad input, before any output is written ----------------
        # first the checks that need no process group, before the ranks rendezvous: a bad
        # config, DeepSpeed JSON, file or model path fails in seconds, on every rank alike
        rank, world = env_rank_world()
        if rank == 0:  # only the global rank 0 takes the folder's lock (below)
            RunLock.check(self.out)  # another live run on this folder: fail before reading it
        check_run_folder(self.out, cfg.output)
        self.resume_from = resume_target(self.out, cfg.output, announce=rank == 0)
        self.ds_teacher, self.ds_student = resolve_ds_configs(cfg, world)
        check_sources(_hub_sources(cfg))  # typos and a missing network fail here, in seconds
        check_files(cfg.data)
        if rank == 0:
            check_master_port()
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        seed_everything(cfg.train.seed)
        self.lock = RunLock(self.out)  # taken by rank 0 before it writes into the folder
        self.tokenizer = self._build_tokenizer()
        self.data = load_task(cfg.data, self.tokenizer, cfg.train.seed)
        self.task = self.data.task
        self.collate = self.task.collator(self.tokenizer)
        if cfg.method.generates:  # on-policy steps: tokens and room to generate
            check_generation_tokens(self.tokenizer)
            check_prompt_room(
                self.data.train, cfg.method.generation.max_new_tokens, cfg.data.max_length
            )
        self.evaluator = Evaluator(
            self.data,
            self.tokenizer,
            self.collate,
            cfg.train,
            rank=self.rank,
            world=self.world,
            out=self.out,
        )
        teacher, student = self._build_models()
        counts = {"teacher": param_counts(teacher), "student": param_counts(student)}
        self.n_params = {role: c[0] for role, c in counts.items()}
        self.n_trainable = {role: c[1] for role, c in counts.items()}
        self.total_steps, self.stage1_steps = self._plan_steps()
        m = cfg.method
        if self.is_main and m.lmbda > 0 and m.lmbda_start_step >= self.total_steps:
            print(
                f"warning: method.lmbda_start_step={m.lmbda_start_step} is not before the end "
                f"of the run's {self.total_steps} distillation steps: no step will be on-policy",
                flush=True,
            )
        # the teacher's schedule spans the steps it learns in
        self.teacher_steps = self.stage1_steps + self.total_steps * self.method.trains_teacher
        self.teacher, self.student = build_engines(
            cfg,
            teacher,
            student,
            teacher_steps=self.teacher_steps,
            student_steps=self.total_steps,
            ds_configs=(self.ds_teacher, self.ds_student),
        )
        self._check_merge_fits()
        self.distiller = self._build_distiller()
        self.fused_head = {"teacher": self.teacher.fused_head, "student": self.student.fused_head}
        self.train_batches = self._batches(self.data.train)
        # quiz batches: same micro-batch size and accumulation as training batches
        self.quiz_batches = self._batches(self.data.quiz) if self.method.needs_quiz else None
        # -- the run so far (a resumed run continues these) -------------------------------------
        self.step = 0
        self.stage1_done = 0
        self.history: list[dict] = []  # evaluations of the whole run (all segments)
        self.wall_before = 0.0  # training time of the earlier segments of a resumed run
        self.t0 = time.time()  # this segment's start (train() sets it again)
        self.bar = None  # the progress bar, while train() runs
        self.plain_progress = False  # train(): plain progress lines (stdout not a terminal)
        self.done_at_start = 0  # train(): the steps done before this segment (steps/s, ETA)
        self.resumed_from: list[str] = []
        self.skipped = {"total": 0, "in_a_row": 0}  # the divergence guard's counts
        t = cfg.train  # a divergence that stays finite: the losses' spike guard
        self.spikes = LossSpikeGuard(
            t.loss_spike_factor, t.loss_spike_steps, t.loss_spike_warmup, t.loss_spike_floor
        )
        # -- outputs ---------------------------------------------------------------------------
        if self.is_main:
            self.lock.acquire()
            if self.lock.taken_over:
                print(
                    f"warning: output.dir {str(self.out)!r}: taking over the lock of a run that "
                    f"ended without releasing it ({holder_text(self.lock.taken_over)})",
                    flush=True,
                )
            if self.resume_from is None:
                self._write_run_files()
            else:  # after the checkpoint is read: a resume that fails leaves the folder as it was
                self.out.mkdir(parents=True, exist_ok=True)
        self.logger = MetricsLogger(
            self.out / "metrics.jsonl",
            enabled=self.is_main,
            wandb=cfg.output.wandb,
            project=cfg.output.wandb_project,
            run_name=cfg.output.run_name or self.out.name,
            config=config_to_dict(cfg),
            resume=self.resume_from is not None,
        )
        self.logger.step_offset = self.stage1_steps
        self.influence_log = self._influence_log()
        self.ratio_every = self.method.influence_ratio_every(cfg)
        if self.resume_from is not None:
            try:
                self._resume(*self.resume_from)
            except BaseException:
                self.lock.release()  # a checkpoint that does not fit: one error, no stale lock
                raise
            if self.is_main:
                self._write_run_files()

    def _write_run_files(self) -> None:
        """Rank 0, once the run can start (a resumed one: once its checkpoint is read): the
        folder cleared or tidied, the resolved config and the data split written."""
        cfg = self.cfg
        prepare_run_folder(self.out, cfg.output, resuming=self.resume_from is not None)
        save_resolved(cfg, self.ds_teacher, self.ds_student, self.out / "config.yaml")
        write_json_atomic(self.out / "data_split.json", self.data.split_record())

    # -- building ---------------------------------------------------------------------------------
    def _build_tokenizer(self):
        cfg = self.cfg
        tok_name = cfg.model.tokenizer or (
            "embedded" if is_embedded(cfg.model.teacher) else cfg.model.teacher
        )
        # the task type named (None: the labels decide; every labelled type reads the same)
        task_cls = get_task(cfg.data.task_type) if cfg.data.task_type else None
        decoder = (task_cls or task_for_labels("classes")).embedded_tokenizer == "decoder"
        corpus = None
        if tok_name == "embedded" and cfg.data.source == "synthetic":
            corpus = synthetic_texts(task_cls, cfg.data.synthetic_examples, cfg.train.seed)
        return build_tokenizer(tok_name, corpus, causal_lm=decoder)

    def _build_models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        m = self.cfg.model
        tok = self.tokenizer
        options = ModelOptions(
            vocab_size=len(tok),
            dropout=m.dropout,
            zero_init_head=m.zero_init_classifier,
            seed=self.cfg.train.seed,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        teacher = self.task.build_model(m.teacher, role="teacher", options=options)
        if m.student == FROM_TEACHER:  # a layer subset, or random init in its architecture
            student = derive_student(
                teacher,
                layers=m.student_layers,
                stride=m.student_layer_stride,
                config=m.student_config,
                seed=init_seed(self.cfg.train.seed, "student"),
            )
        else:
            student = self.task.build_model(m.student, role="student", options=options)
        self.task.check_pair(teacher, student, m.teacher, m.student)
        # LoRA adapters (after the student is made from the teacher: it gets its own); the
        # hidden-state projections below are added after them and stay trainable
        seed = self.cfg.train.seed
        teacher, student = (
            apply_adapters(
                model,
                getattr(m, f"{role}_peft"),
                key=f"model.{role}_peft",
                name=getattr(m, role),
                seed=init_seed(seed, role) + 7,  # not the base model's initialisation stream
            )
            for role, model in (("teacher", teacher), ("student", student))
        )
        # hidden-state KD across widths: the student's projections, before its engine exists
        spec = HiddenSpec.of(self.cfg.method)
        attach_projection(student, teacher, spec, seed=self.cfg.train.seed)
        tok_name = m.tokenizer or m.teacher
        for role, name in (("teacher", m.teacher), ("student", m.student)):
            if name not in (tok_name, FROM_TEACHER):  # the run's tokenizer vs the model's own
                self.task.check_tokenizers(tok, own_tokenizer(name), tok_name, role, name)
        for model, on in (
            (teacher, m.teacher_gradient_checkpointing),
            (student, m.student_gradient_checkpointing),
        ):
            if on:
                _checkpoint_activations(model)
        return teacher, student

    def _plan_steps(self) -> tuple[int, int]:
        """(optimizer steps of distillation, of the teacher-only stage 1)."""
        cfg, n = self.cfg, len(self.data.train)
        _, steps = optimizer_steps(n, cfg, self.world, cfg.train.epochs)
        nq, mbs = len(self.data.quiz), cfg.train.micro_batch_size
        if self.method.needs_quiz and nq // self.world < mbs:
            where = (
                "data.quiz_fraction of the training split"
                if cfg.data.quiz_source == "train"
                else "the validation split (data.quiz_source=validation)"
            )
            raise ConfigError(
                f"the quiz split has {nq} examples ({where}): fewer than one micro-batch of "
                f"train.micro_batch_size={mbs} on each of {self.world} rank(s); raise "
                f"data.quiz_fraction, give the data more rows, or lower train.micro_batch_size"
            )
        stage1 = 0
        if self.method.teacher_stage1 and self.method.stage1_epochs(cfg) > 0:
            _, s1 = optimizer_steps(n, cfg, self.world, self.method.stage1_epochs(cfg))
            stage1 = min(s1, cfg.train.max_steps) if cfg.train.max_steps else s1
        return cfg.train.max_steps or steps, stage1

    def _check_merge_fits(self) -> None:
        """``output.merge_adapters`` with a ZeRO-3 role: the main rank assembles the merged
        model in its host memory at the end (gathered layer by layer from the partitions, so no
        device holds it whole). One clear error now, not after the training, where that host
        has less memory available than the merged model needs. Collective (rank 0's figure)."""
        cfg = self.cfg
        roles = [("student", self.student)]
        if cfg.output.save_teacher:
            roles.append(("teacher", self.teacher))
        need = {
            role: self.n_params[role] * torch.finfo(e.module_dtype).bits // 8
            for role, e in roles
            if cfg.output.merge_adapters and e.stage == 3 and peft_wrapper(e.module) is not None
        }
        if not need:
            return
        free = all_gather_object(host_memory_available() if self.is_main else None)[0]
        for role, n in need.items():
            if free is not None and n > free:
                raise ConfigError(
                    f"output.merge_adapters: the merged {role} ({n / 2**30:.1f} GiB) is "
                    f"assembled in rank 0's host memory at the end of a ZeRO-3 run, which has "
                    f"{free / 2**30:.1f} GiB available: set output.merge_adapters=false (the "
                    f"adapter folder is saved; merge it later where the model fits, with peft's "
                    f"PeftModel.from_pretrained(base, folder).merge_and_unload())"
                )

    def _build_distiller(self) -> Distiller:
        cfg = self.cfg
        self.task.head_chunk = cfg.model.fused_head_chunk
        with warnings.catch_warnings():  # the notes below say it once, on rank 0
            warnings.simplefilter("ignore", FullLogitsWarning)
            distiller = Distiller(
                config=cfg.method,
                teacher=self.teacher,
                student=self.student,
                task=self.task,
                fused_head=cfg.model.fused_head,
                tokenizer=self.tokenizer if cfg.method.generates else None,
                seed=cfg.train.seed,
            )
        for role, reason in distiller.full_logits.items():
            if self.is_main:
                print(f"note: the {role} uses full logits, not the fused head: {reason}")
        return distiller

    def _batches(self, ds) -> GlobalBatches:
        cfg = self.cfg
        lengths = [len(x) for x in ds["input_ids"]] if cfg.data.group_by_length else None
        return GlobalBatches(
            ds,
            micro_batch_size=cfg.train.micro_batch_size,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            seed=cfg.train.seed,
            rank=self.rank,
            world_size=self.world,
            collate_fn=self.collate,
            lengths=lengths,
        )

    def _influence_log(self) -> InfluenceLog | None:
        """influence.jsonl (methods that report influence, ``output.influence_log``)."""
        cfg = self.cfg
        if not (self.method.reports_influence and cfg.output.influence_log):
            return None
        train = self.data.train
        return InfluenceLog(
            self.out / INFLUENCE_FILE,
            is_main=self.is_main,
            resume=self.resume_from is not None,
            source_indices=(
                train["source_index"] if "source_index" in train.column_names else range(len(train))
            ),
            examples=cfg.output.influence_log_examples,
            max_rows=cfg.output.influence_log_max_rows,
            seed=cfg.train.seed,
        )

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, split: str = "eval") -> dict:
        """Teacher and student metrics on the eval (or test) split, all ranks: the evaluator's."""
        return self.evaluator.evaluate(
            {"teacher": self.teacher, "student": self.student}, self.step, split
        )

    def _log_eval(self, ev: dict) -> None:
        self.history.append({"step": self.step, **ev})
        self.logger.log({"step": self.step, "eval": True, **ev}, tables=self.evaluator.tables())

    # -- training ----------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.t0 = time.time()
        self.bar = tqdm(
            total=self.stage1_steps + self.total_steps,
            initial=self.stage1_done + self.step,
            # a bar needs a terminal: in a log file it is one line of \r updates
            disable=not (self.is_main and sys.stderr.isatty()),
            desc=cfg.method.name,
            dynamic_ncols=True,
        )
        # no terminal (a batch job's log, `| tee`): a plain line every train.log_every steps
        self.plain_progress = self.is_main and not sys.stdout.isatty()
        self.done_at_start = self.stage1_done + self.step
        try:
            with signals.deferred(cfg.output.checkpoint_on_signal):
                self._teacher_stage1()
                self._distill()
        except (signals.Interrupted, KeyboardInterrupt) as e:
            self._interrupted(e)
            raise
        self.bar.close()
        return {"wall_s": self.wall_before + time.time() - self.t0, "history": self.history}

    def _distill(self) -> None:
        cfg = self.cfg
        if self.step == 0:  # the starting point (after vanilla KD's stage 1)
            self._log_eval(self.evaluate())
        while self.step < self.total_steps:
            quiz = self.quiz_batches.next() if self.quiz_batches is not None else None
            batch = self.train_batches.next()
            ratio = bool(self.ratio_every) and (self.step + 1) % self.ratio_every == 0
            m = self.distiller.step(
                batch,
                quiz,
                example_stats=self.influence_log is not None,
                influence_ratio=ratio,
            )
            self.step += 1
            self.bar.update(1)
            self._log_step(m, batch)
            self._guard(m, self.step)
            self._guard_spikes(m, self.step)
            last = self.step == self.total_steps
            if last or (cfg.train.eval_every and self.step % cfg.train.eval_every == 0):
                self._log_eval(self.evaluate())
            every = cfg.output.checkpoint_every
            if every and self.step % every == 0 and not last:
                self.save_checkpoint()
            if not last:
                self._stop_if_signalled(f"step{self.step}")

    def _teacher_stage1(self) -> None:
        """Teacher-only fine-tuning before distillation (methods with ``teacher_stage1``)."""
        while self.stage1_done < self.stage1_steps:
            m = self.distiller.teacher_finetune_step(self.train_batches.next())
            self.stage1_done += 1
            self.bar.update(1)
            if self.stage1_done % self.cfg.train.log_every == 0 or m.get("skipped"):
                self.logger.log({"stage": 1, "step": self.stage1_done, **m})
            if self.stage1_done % self.cfg.train.log_every == 0:
                self._progress_line(
                    f"teacher stage-1 step {self.stage1_done}/{self.stage1_steps}", m
                )
            self._guard(m, self.stage1_done, stage1=True)
            self._guard_spikes(m, self.stage1_done, stage1=True)
            every = self.cfg.output.checkpoint_every
            if every and self.stage1_done % every == 0 and self.stage1_done < self.stage1_steps:
                self.save_checkpoint(f"stage1_step{self.stage1_done}")
            self._stop_if_signalled(f"stage1_step{self.stage1_done}")

    def _log_step(self, m: dict, batch: list[dict]) -> None:
        influence = m.pop("influence", None)
        generations = m.pop("generations", None)
        if generations is not None and self.is_main:  # on-policy: what was generated
            write_generations(self.out, self.step, generations, self.tokenizer)
        stats = m.pop("example_stats", {})
        hist = None
        if influence is not None:
            if self.influence_log is not None:  # a collective: the whole global batch's values
                values = self.influence_log.add(
                    self.step, self.train_batches.epoch, batch, influence, stats
                )
            else:
                values = influence.double().numpy()
            m["influence_mean"] = float(values.mean())
            m["influence_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
            m["influence_neg_frac"] = float((values < 0).mean())
            hist = {"influence": values}
        m["student_lr"] = self.student.lr()
        if self.method.trains_teacher:
            m["teacher_lr"] = self.teacher.lr()
        log = self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps
        if log or m.get("skipped"):  # skipped steps are always in metrics.jsonl
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in m.items() if "loss" in k})
            if log:
                self._progress_line(f"step {self.step}/{self.total_steps}", m)
            row = {"step": self.step, "epoch": self.train_batches.epoch, **m}
            self.logger.log(row, histograms=hist)

    def _progress_line(self, where: str, m: dict) -> None:
        """The bar's content as one plain line (stdout not a terminal): where, the losses,
        steps/s of this segment, the time left."""
        if not self.plain_progress:
            return
        done = self.stage1_done + self.step
        elapsed = time.time() - self.t0
        rate = (done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        left = self.stage1_steps + self.total_steps - done
        losses = " ".join(
            f"{k} {v:.4g}"
            for k, v in m.items()
            if ("loss" in k or k.endswith("_ce")) and _is_num(v)  # stage 1: teacher_ce
        )
        eta = _duration(left / rate) if rate > 0 else "?"
        print(f"{where} | {losses} | {rate:.3g} steps/s | ETA {eta}", flush=True)

    # -- divergence guard ------------------------------------------------------------------------
    def _guard(self, m: dict, step: int, stage1: bool = False) -> None:
        """Count a skipped step (the engines skipped it: a non-finite gradient, loss or
        influence, or an fp16 overflow), warn, and stop the run after
        ``train.max_skipped_steps`` in a row."""
        if not m.get("skipped"):
            self.skipped["in_a_row"] = 0
            return
        self.skipped["total"] += 1
        self.skipped["in_a_row"] += 1
        n, cap = self.skipped, self.cfg.train.max_skipped_steps
        where = f"teacher stage-1 step {step}" if stage1 else f"step {step}"
        bad = [k for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)]
        why = "non-finite " + ", ".join(bad) if bad else "a non-finite gradient or fp16 overflow"
        engines = {"both": "both engines", "teacher": "the teacher", "student": "the student"}
        if self.is_main and (n["total"] <= 10 or n["total"] % 100 == 0):
            self.bar.write(
                f"warning: {where} skipped in {engines.get(m['skipped'], m['skipped'])} ({why}); "
                f"{n['in_a_row']} in a row, {n['total']} in all"
                + (f"; the run stops after train.max_skipped_steps={cap} in a row" if cap else "")
            )
        if cap and n["in_a_row"] >= cap:
            first = step - n["in_a_row"] + 1
            self._fail(
                f"training diverged: {n['in_a_row']} optimizer steps in a row skipped ({where}"
                f" back to {first}; {why})",
                "lower train.student_lr / train.teacher_lr, set train.max_grad_norm, or raise "
                "train.max_skipped_steps (0 = never stop)",
            )

    def _guard_spikes(self, m: dict, step: int, stage1: bool = False) -> None:
        """The loss-spike guard (``train.loss_spike_*``): a warning when a loss first goes over
        its bound, a stop (summary marked diverged) when it stays there
        ``train.loss_spike_steps`` steps in a row."""
        if not self.spikes.enabled:
            return
        names = ("teacher_ce",) if stage1 else ("teacher_loss", "student_loss")
        losses = {k: float(m[k]) for k in names if _is_num(m.get(k))}
        if self.world > 1:  # the mean over ranks: every rank judges alike and stops together
            # note: a collective and a host sync, every step
            per_rank = all_gather_object(losses)
            losses = {k: sum(r[k] for r in per_rank) / len(per_rank) for k in losses}
        spikes = self.spikes.update(step, losses)
        where = "teacher stage-1 step" if stage1 else "step"
        t = self.cfg.train
        for s in spikes:
            if s.in_a_row == 1 and self.is_main:
                self.bar.write(
                    f"warning: {where} {step}: {s.name} {s.loss:.4g} is above "
                    f"train.loss_spike_factor={t.loss_spike_factor:g} x its reference "
                    f"{s.describe_reference()}; the run stops after "
                    f"train.loss_spike_steps={t.loss_spike_steps} such steps in a row"
                )
        s = self.spikes.diverged(spikes)
        if s is not None:
            self._fail(
                f"training diverged: {s.name} {s.loss:.4g} above {t.loss_spike_factor:g} x its "
                f"reference {s.describe_reference()} for {s.in_a_row} steps in a row "
                f"({where} {step} back to {s.first})",
                "lower train.student_lr / train.teacher_lr, set train.max_grad_norm, or tune "
                "train.loss_spike_factor / train.loss_spike_steps (loss_spike_factor=0 = off)",
                status="diverged",
            )

    # -- stopped from outside --------------------------------------------------------------------
    def _stop_if_signalled(self, tag: str) -> None:
        """``output.checkpoint_on_signal``, at a step's end: when a rank got SIGINT / SIGTERM
        (all ranks agree: a collective), save checkpoint ``tag`` (unless just saved) and stop."""
        if not self.cfg.output.checkpoint_on_signal:
            return
        sig = signals.pending()
        if self.world > 1:  # a collective: every rank asks, every step
            sig = max((s or 0 for s in all_gather_object(sig)), default=0) or None
        if sig is None:
            return
        latest = self.out / "checkpoints" / "latest"
        if not (latest.exists() and latest.read_text().strip() == tag):
            self.save_checkpoint(tag)
        raise signals.Interrupted(sig)

    def _interrupted(self, e: BaseException) -> None:
        """SIGINT / SIGTERM (or a notebook's KeyboardInterrupt) in training: a summary marked
        interrupted with the step and the checkpoint to continue from, no model saved, the
        lock let go; ``e.message``: the command's one line. No collective: the other ranks may
        be gone."""
        signum = e.signum if isinstance(e, signals.Interrupted) else int(signal.SIGINT)
        name = signal.Signals(signum).name
        if self.bar is not None:
            self.bar.close()
        at = (
            f"teacher stage-1 step {self.stage1_done}"
            if self.stage1_done < self.stage1_steps
            else f"step {self.step}"
        )
        latest = self.out / "checkpoints" / "latest"
        tag = latest.read_text().strip() if latest.exists() else None
        resume = (
            describe_tag(tag)
            if tag
            else "the start (no checkpoint yet: output.checkpoint_every=N saves them)"
        )
        message = (
            f"interrupted ({name}) at {at}; the same command with output.resume=auto "
            f"continues from {resume}"
        )
        if isinstance(e, signals.Interrupted):
            e.message = message
        summary = self._summary(
            final={}, wall_s=self.wall_before + time.time() - self.t0, status="interrupted"
        )
        summary["interrupted"] = {
            "signal": name,
            "step": self.step,
            "stage1_step": self.stage1_done,
            "resume_from": str(self.out / "checkpoints" / tag) if tag else None,
            "message": message,
        }
        summary["peak_memory"] = _peak_memory(all_ranks=False)
        if self.is_main:
            (self.out / "summary.txt").write_text(format_summary(summary, self.out) + "\n")
            write_json_atomic(self.out / "summary.json", summary)
        self.logger.close()
        if self.influence_log is not None:
            self.influence_log.close()
        self.lock.release()

    def _fail(self, reason: str, advice: str, status: str | None = None) -> None:
        """Write a summary marked failed (or ``status``; no model saved) and stop with one
        clear error."""
        self.bar.close()
        summary = self._summary(
            final={}, wall_s=self.wall_before + time.time() - self.t0, failure=reason, status=status
        )
        summary["advice"] = advice
        summary["peak_memory"] = _peak_memory(all_ranks=False)  # no collective on a failure
        if self.is_main:
            text = format_summary(summary, self.out)
            (self.out / "summary.txt").write_text(text + "\n")
            write_json_atomic(self.out / "summary.json", summary)
        self.logger.close()
        if self.influence_log is not None:
            self.influence_log.close()
        self.lock.release()
        latest = self.out / "checkpoints" / "latest"
        hint = (
            f"; the newest checkpoint is {self.out / 'checkpoints' / latest.read_text().strip()}"
            if latest.exists()
            else ""
        )
        raise TrainingError(f"{reason}: {advice}{hint} (summary: {self.out / 'summary.txt'})")

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, tag: str | None = None) -> None:
        state = {
            "step": self.step,
            "stage1_done": self.stage1_done,
            "train": self.train_batches.state_dict(),
            "quiz": self.quiz_batches.state_dict() if self.quiz_batches else None,
            # the run so far, so that a resumed run's outputs cover all of it
            "metrics_rows": self.logger.rows,
            "history": self.history,
            "wall_s": self.wall_before + time.time() - self.t0,
            "resumed_from": self.resumed_from,
            "skipped": self.skipped,
            "loss_spikes": self.spikes.state_dict(),
            "influence_rows": self.influence_log.rows if self.influence_log else None,
            "method_state": self.distiller.method.state_dict(),
            "onpolicy": self.distiller.onpolicy.state_dict() if self.distiller.onpolicy else None,
        }
        save_checkpoint(
            self.out / "checkpoints",
            tag or f"step{self.step}",
            self.teacher,
            self.student,
            state,
            rank=self.rank,
            is_main=self.is_main,
            keep=self.cfg.output.keep_checkpoints,
        )

    def _resume(self, root: Path, tag: str) -> None:
        st = load_checkpoint(root, tag, self.teacher, self.student)
        self.step, self.stage1_done = st["step"], st["stage1_done"]
        self.history = list(st.get("history", []))
        self.wall_before = float(st.get("wall_s", 0.0))
        self.resumed_from = [*st.get("resumed_from", []), str(root / tag)]
        self.skipped = dict(st.get("skipped", self.skipped))
        self.spikes.load_state_dict(st.get("loss_spikes") or {})
        # metrics.jsonl back to the checkpoint: rows logged after it are logged again
        self.logger.truncate(st.get("metrics_rows"))
        if self.influence_log is not None:
            self.influence_log.truncate(st.get("influence_rows"))
        self.distiller.method.load_state_dict(st.get("method_state") or {})
        if self.distiller.onpolicy is not None and st.get("onpolicy"):
            self.distiller.onpolicy.load_state_dict(st["onpolicy"])
        self.logger.log({"step": self.step, "stage1_done": self.stage1_done, "resumed_from": tag})
        self.train_batches.load_state_dict(st["train"])
        if self.quiz_batches is not None and st["quiz"]:
            self.quiz_batches.load_state_dict(st["quiz"])
        restore_rng(root, tag, rank=self.rank)  # last: the loaders above draw from the RNG

    # -- final outputs -----------------------------------------------------------------------------
    def finish(self, result: dict) -> dict:
        cfg = self.cfg
        final = result["history"][-1] if result["history"] else self.evaluate()
        # the hidden-state projections are training machinery, not part of the student
        merge = cfg.output.merge_adapters
        self.student.save_pretrained(
            str(self.out / "student"), self.is_main, drop=HIDDEN_PROJ, merge=merge
        )
        if cfg.output.save_teacher:
            self.teacher.save_pretrained(str(self.out / "teacher"), self.is_main, merge=merge)
        summary = self._summary(final=final, wall_s=result["wall_s"])
        if self.data.test is not None:  # read once, after training; never used for selection
            summary["test"] = self.evaluate("test")
            self.logger.log({"step": self.step, "split": "test", **summary["test"]})
        summary["peak_memory"] = _peak_memory(all_ranks=True)
        if self.influence_log is not None:
            log = self.influence_log
            summary["influence_log"] = {
                "file": INFLUENCE_FILE,
                "rows": log.rows,
                "capped_at": self.cfg.output.influence_log_max_rows if log.capped else None,
            }
        if self.is_main:
            split = self.data.split_record()
            for role in ("student", "teacher") if cfg.output.save_teacher else ("student",):
                self.tokenizer.save_pretrained(str(self.out / role))
                card = model_card(role, cfg, summary, split)
                atomic_write_text(self.out / role / "README.md", card)
            text = format_summary(summary, self.out)
            (self.out / "summary.txt").write_text(text + "\n")
            write_json_atomic(self.out / "summary.json", summary)  # last: marks the run complete
            print(text, flush=True)
        self.logger.close()
        if self.influence_log is not None:
            self.influence_log.close()
        self.lock.release()
        return summary

    def _summary(
        self, *, final: dict, wall_s: float, failure: str | None = None, status: str | None = None
    ) -> dict:
        return build_summary(
            self.cfg,
            task_name=self.data.name,
            primary=self.evaluator.best_metric,
            lower_is_better=self.evaluator.best_metric in self.task.lower_is_better,
            data=self.data.split_record(),
            steps=self.step,
            stage1_steps=self.stage1_done,
            world=self.world,
            wall_s=wall_s,
            params=self.n_params,
            # a role built without an optimizer trains nothing, whatever requires_grad says
            trainable_params={
                r: 0 if e.frozen else self.n_trainable[r]
                for r, e in (("teacher", self.teacher), ("student", self.student))
            },
            zero_stage={"teacher": self.teacher.stage, "student": self.student.stage},
            frozen=[
                r for r, e in (("teacher", self.teacher), ("student", self.student)) if e.frozen
            ],
            fused_head=self.fused_head,
            final=final,
            history=self.history,
            resumed_from=self.resumed_from,
            skipped_steps=self.skipped["total"],
            failure=failure,
            status=status,
        )


def host_memory_available() -> int | None:
    """Bytes of host memory available to a new allocation (psutil's ``available``: Linux's
    ``MemAvailable``, and its counterpart on macOS and Windows), or None where unknown."""
    import psutil

    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, AttributeError):  # a platform psutil cannot read
        return None


def _peak_memory(all_ranks: bool) -> dict:
    """``{"kind": "cuda" | "cpu", "mb": ...}``: max CUDA memory allocated on this device, or the
    process's peak resident set (Linux ``ru_maxrss``, KiB); the max over ranks with
    ``all_ranks`` (a collective: every rank calls it)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        kind, mb = "cuda", torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        kind, mb = "cpu", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if all_ranks:
        mb = max(all_gather_object(mb))
    return {"kind": kind, "mb": round(mb, 1)}


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _duration(seconds: float) -> str:
    """``3725`` -> ``1h02m05s``; ``65`` -> ``1m05s``; ``7`` -> ``7s``."""
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _hub_sources(cfg: ExperimentConfig) -> list[tuple[str, str, str]]:
    """(key, name, repo type) of every model, tokenizer and dataset the run may load from the
    hub or a folder."""
    m, d = cfg.model, cfg.data
    out = [(f"model.{r}", getattr(m, r), "model") for r in ("teacher", "student")]
    if m.tokenizer:
        out.append(("model.tokenizer", m.tokenizer, "model"))
    out = [
        (k, n, t) for k, n, t in out if n not in ("embedded", FROM_TEACHER) and not is_embedded(n)
    ]
    if d.source == "glue" and (d.task or "").lower() in GLUE_TASKS:  # else: the task's error
        out.append(("data.source=glue", GLUE_DATASET_ID, "dataset"))
    elif d.source == "hub" and d.dataset:
        out.append(("data.dataset", d.dataset, "dataset"))
    return out


def _checkpoint_activations(model: torch.nn.Module) -> None:
    """Hugging Face activation checkpointing, non-reentrant (works with ``autograd.grad`` and
    the functional influence passes); ``gradient_checkpointing_enable`` before transformers 5."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(kwargs)


def run(cfg: ExperimentConfig) -> dict:
    trainer = Trainer(cfg)
    return trainer.finish(trainer.train())
