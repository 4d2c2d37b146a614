"""Evaluation, a component the trainer calls (torchtitan's ``Validator`` shape): both models'
metrics on the held-out split, and for task types that generate (``Task.generates``) greedy
completions of held-out prompts (``train.eval_generate``), scored against the references.

Every rank evaluates its share of the split (padded so that every rank runs the same number of
batches, i.e. of collectives); the rows are gathered onto rank 0's order and scored once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..data import make_loader
from ..engines.dist import all_gather_object
from ..errors import ConfigError
from ..io import atomic_write_text
from ..tasks.generation import greedy_complete, prompt_and_reference, word_f1

GENERATION_METRICS = ("exact_match", "gen_f1")


class Evaluator:
    """``evaluate(engines, step)``: ``role/metric`` scores of the eval split (all ranks);
    ``evaluate(engines, step, split="test")``: of the test split, once after training.

    ``data``: the run's ``TaskData``; ``train``: the ``train`` section (eval batch size,
    ``eval_generate``, ``eval_max_new_tokens``, ``best_metric``); ``out``: the run folder
    (``generations/step<k>.jsonl``, written by rank 0)."""

    def __init__(self, data, tokenizer, collate, train, *, rank: int, world: int, out: Path):
        self.data, self.task, self.tokenizer, self.collate = data, data.task, tokenizer, collate
        self.cfg, self.rank, self.world, self.out = train, rank, world, out
        # the held-out rows eval_generate completes, per split
        self.gen_rows = self._generation_rows(data.eval)
        self.test_gen_rows = self._generation_rows(data.test) if data.test is not None else []
        self.best_metric = self._best_metric()
        self.last_generations: list[dict] = []  # the last evaluation's completions

    def _generation_rows(self, ev) -> list[int]:
        """The rows of ``ev`` (a held-out split) ``train.eval_generate`` completes: the first N
        with a prompt."""
        k = self.cfg.eval_generate
        if not k:
            return []
        if not self.task.generates:
            raise ConfigError(
                f"train.eval_generate={k} is for decoders (task types that generate, e.g. "
                f"data.task_type causal_lm); this run's task is {self.task.name!r}"
            )
        rows = []
        for i in range(len(ev)):
            if prompt_and_reference(ev[i]["input_ids"], ev[i]["labels"]) is not None:
                rows.append(i)
                if len(rows) == k:
                    break
        if not rows:
            raise ConfigError(
                f"train.eval_generate={k}: no held-out example has a prompt to complete (the "
                f"loss starts at the first token: data.format text); use format "
                f"prompt_completion or messages, or eval_generate=0"
            )
        return rows

    def _best_metric(self) -> str:
        """``train.best_metric`` (checked against what this run's evaluations report), or the
        task's primary metric."""
        name = self.cfg.best_metric
        if name is None:
            return self.task.primary_metric
        known = list(self.task.metric_names)
        if self.gen_rows:
            known += GENERATION_METRICS
        if name not in known:
            raise ConfigError(
                f"train.best_metric={name!r} is not a student metric of this run; it reports "
                f"{', '.join(known)}"
                + ("" if self.gen_rows else " (exact_match / gen_f1 need train.eval_generate)")
            )
        return name

    # -- one evaluation ----------------------------------------------------------------------
    def evaluate(self, engines: dict, step: int, split: str = "eval") -> dict:
        """Teacher and student metrics on the eval split, or the test split (``split="test"``,
        read once after training), on all ranks: rank-sharded, gathered."""
        ds = self.data.test if split == "test" else self.data.eval
        n = len(ds)
        mine = self._rank_share(list(range(n)))
        loader = make_loader(
            ds.select(mine),
            self.cfg.eval_batch_size,
            shuffle=False,
            seed=0,
            drop_last=False,
            collate_fn=self.collate,
        )
        for eng in engines.values():
            eng.module.eval()
        parts: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for b in loader:
                logits = {role: eng.forward(b) for role, eng in engines.items()}
                for key, rows in self.task.eval_rows(logits, b).items():
                    parts.setdefault(key, []).append(rows)
                del logits
        for eng in engines.values():
            eng.module.train()
        mine_rows = {k: np.concatenate(v) for k, v in parts.items()}
        full = {}
        for ids, rows in all_gather_object((mine, mine_rows)):
            for k, a in rows.items():
                if k not in full:
                    full[k] = np.zeros((n, *a.shape[1:]), dtype=a.dtype)
                full[k][np.asarray(ids)] = a  # padded duplicates land on their own row
        scores = self.task.score(full, ds["labels"])
        gen_rows = self.test_gen_rows if split == "test" else self.gen_rows
        if gen_rows:
            name = "test" if split == "test" else f"step{step}"
            scores.update(self._generation_eval(engines, ds, gen_rows, name))
        return scores

    def tables(self) -> dict | None:
        """The last evaluation's completions as a W&B table (``generations``), if any."""
        recs = self.last_generations
        if not recs:
            return None
        columns = list(recs[0])
        return {"generations": (columns, [[r[c] for c in columns] for r in recs])}

    def _rank_share(self, items: list) -> list:
        """This rank's share of ``items`` (every world-th from its rank), the list padded with
        its own head so that every rank gets the same count (the same number of batches, i.e.
        of collectives); the padded duplicates are gathered back onto their own rows."""
        per = math.ceil(len(items) / self.world)
        padded = items + items[: per * self.world - len(items)]
        return padded[self.rank :: self.world]

    def _generation_eval(self, engines: dict, ev, rows: list[int], name: str) -> dict:
        """``train.eval_generate``: both models greedily complete the prompts of ``rows`` of
        the held-out split ``ev`` (rank-sharded, gathered), scored against the references;
        rank 0 writes ``generations/<name>.jsonl`` (prompt, reference, both completions)."""
        cfg, tok = self.cfg, self.tokenizer
        mine = self._rank_share(rows)
        pairs = [prompt_and_reference(ev[i]["input_ids"], ev[i]["labels"]) for i in mine]
        bs = cfg.eval_batch_size
        done = {}
        for role, eng in engines.items():
            eng.module.eval()
            synced = self.world > 1 and getattr(eng, "stage", 0) == 3  # forwards are collectives
            done[role] = []
            for lo in range(0, len(pairs), bs):
                done[role] += greedy_complete(
                    eng.module,
                    [p for p, _ in pairs[lo : lo + bs]],
                    pad_id=self.collate.pad_id,
                    eos_id=tok.eos_token_id,
                    max_new_tokens=cfg.eval_max_new_tokens,
                    synced_gpus=synced,
                )
            eng.module.train()
        by_row = {}
        for ids, got in all_gather_object((mine, done)):
            for j, i in enumerate(ids):
                by_row[i] = {role: got[role][j] for role in got}

        def text(ids):
            return tok.decode(ids, skip_special_tokens=True).strip()

        records, out = [], {}
        for i in rows:
            prompt, ref = prompt_and_reference(ev[i]["input_ids"], ev[i]["labels"])
            rec = {"eval_index": i, "prompt": text(prompt), "reference": text(ref)}
            for role in engines:
                rec[role] = text(by_row[i][role])
                rec[f"{role}_exact"] = rec[role] == rec["reference"]
                rec[f"{role}_f1"] = word_f1(rec[role], rec["reference"])
            records.append(rec)
        for role in engines:
            out[f"{role}/exact_match"] = float(np.mean([r[f"{role}_exact"] for r in records]))
            out[f"{role}/gen_f1"] = float(np.mean([r[f"{role}_f1"] for r in records]))
        if self.rank == 0:
            lines = "".join(json.dumps(r) + "\n" for r in records)
            atomic_write_text(self.out / "generations" / f"{name}.jsonl", lines)
        self.last_generations = records
        return out
