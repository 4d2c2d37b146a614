"""Loaders: rank-sharded, seeded, resumable batches of the task's collated tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..errors import DataError


def make_loader(
    ds: datasets.Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool,
    collate_fn: Callable[[list[dict]], dict],
    epoch: int = 0,
) -> DataLoader:
    """A DataLoader of ``collate_fn`` batches (the task's collator) over this rank's shard of
    ``ds``.

    Sharding is ``DistributedSampler(num_replicas=world_size, rank=rank, shuffle, seed,
    drop_last)`` (also for one rank); call ``loader.sampler.set_epoch(e)`` for a new order. Note
    that with ``drop_last=False`` and ``len(ds)`` not divisible by ``world_size`` the sampler
    repeats a few rows so that every rank gets the same number.
    """
    _check_shard(batch_size, rank, world_size)
    sampler = DistributedSampler(
        ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    return _sampled_loader(ds, sampler, batch_size, drop_last, collate_fn, seed)


def _check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")


def _sampled_loader(ds, sampler, batch_size, drop_last, collate_fn, seed) -> DataLoader:
    """The one DataLoader shape both orders use: in-process (num_workers=0), its own generator."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=collate_fn,
        num_workers=0,
        generator=_own_generator(seed),
    )


def _own_generator(seed: int) -> torch.Generator:
    """The DataLoader's own generator. Every new iterator (each epoch) draws a base seed from
    the loader's generator, or from the *global* RNG without one: that draw would shift the
    dropout stream at every epoch boundary, and a run resumed from a checkpoint taken right after
    an epoch ended (whose next iterator is created before the saved RNG is restored) would then
    differ from the uninterrupted run."""
    return torch.Generator().manual_seed(int(seed))


class InfiniteLoader:
    """Cycles a :func:`make_loader` loader forever; epoch ``e`` calls ``sampler.set_epoch(e)``, so
    the order of each pass is a deterministic function of (seed, e).

    ``state_dict()`` / ``load_state_dict()`` record (epoch, batches consumed in it) for resuming.
    """

    def __init__(self, loader: DataLoader, start_epoch: int = 0):
        if len(loader) == 0:
            raise DataError(
                f"a split of {len(loader.dataset)} rows gives no batch of "
                f"{loader.batch_size} per rank (drop_last); lower train.micro_batch_size or give "
                "the split more rows"
            )
        self.loader = loader
        self.epoch = start_epoch
        self.position = 0
        self._it: Iterator | None = None

    def _start_epoch(self, skip: int = 0) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        self._it = iter(self.loader)
        for _ in range(skip):
            next(self._it)
        self.position = skip

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._start_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._start_epoch()
            batch = next(self._it)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        n = len(self.loader)
        epoch, position = int(state["epoch"]), int(state["position"])
        self.epoch = epoch + position // n  # a finished pass resumes at the next epoch
        self._start_epoch(skip=position % n)


# Megabatch of the length-grouped order, in global batches (Hugging Face's LengthGroupedSampler
# uses 50 batches too).
MEGABATCH_GLOBAL_BATCHES = 50


class LengthGroupedSampler(Sampler[int]):
    """This rank's indices of one epoch, in an order where each micro-batch (each chunk of
    ``micro_batch_size``) holds examples of similar length, for every rank alike.

    Epoch ``e`` (Hugging Face's LengthGroupedSampler idea, made rank-aware and resumable):

    1. a permutation of the rows from ``torch.Generator().manual_seed(seed + e)`` (as
       ``DistributedSampler``), cut to a whole number ``k`` of micro-steps of
       ``micro_batch_size * world_size`` rows (the rows past it are left out this epoch, at
       random, like ``drop_last``);
    2. megabatches of ``micro_batch_size * world_size * megabatch_steps`` consecutive rows, each
       sorted by length, longest first (ties: permutation order), cut into micro-steps: rank r
       takes rows ``[r * micro, (r + 1) * micro)`` of each, so the ranks' micro-batches of one
       step have similar lengths too;
    3. the order of the ``k`` micro-steps shuffled with the same generator, so that length does
       not drift within a megabatch.

    Every rank yields ``k * micro_batch_size`` indices; the order is a function of (seed, epoch)
    only, so resuming by (epoch, batches consumed) replays it exactly."""

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        micro_batch_size: int,
        megabatch_steps: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.micro = micro_batch_size
        self.step_rows = micro_batch_size * world_size
        self.mega_rows = self.step_rows * max(1, megabatch_steps)
        self.seed, self.rank = seed, rank
        self.steps = len(self.lengths) // self.step_rows
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.micro

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).numpy()[: self.steps * self.step_rows]
        steps = []
        for lo in range(0, len(perm), self.mega_rows):
            mega = perm[lo : lo + self.mega_rows]
            mega = mega[np.argsort(-self.lengths[mega], kind="stable")]
            steps += [mega[i : i + self.step_rows] for i in range(0, len(mega), self.step_rows)]
        order = torch.randperm(len(steps), generator=g).tolist()
        lo, hi = self.rank * self.micro, (self.rank + 1) * self.micro
        for i in order:
            yield from (int(x) for x in steps[i][lo:hi])


class GlobalBatches:
    """Global batches for the training loop: lists of ``gradient_accumulation_steps``
    micro-batches, epoch after epoch, deterministic in (seed, epoch), resumable by
    (epoch, position). A global batch never straddles two epochs: an epoch's incomplete tail
    is dropped.

    ``lengths`` (one per row of ``ds``, e.g. its token counts): group rows of similar length into
    the same micro-batches (:class:`LengthGroupedSampler`, megabatches of
    :data:`MEGABATCH_GLOBAL_BATCHES` global batches) to spend less compute on padding; None:
    ``DistributedSampler`` order (:func:`make_loader`)."""

    def __init__(
        self,
        ds: datasets.Dataset,
        *,
        micro_batch_size: int,
        gradient_accumulation_steps: int,
        seed: int,
        rank: int,
        world_size: int,
        collate_fn: Callable[[list[dict]], dict],
        lengths: Sequence[int] | None = None,
    ):
        if lengths is None:
            self.loader = make_loader(
                ds,
                micro_batch_size,
                shuffle=True,
                seed=seed,
                rank=rank,
                world_size=world_size,
                drop_last=True,
                collate_fn=collate_fn,
            )
        else:
            self.loader = _length_grouped_loader(
                ds,
                lengths,
                micro_batch_size=micro_batch_size,
                megabatch_steps=gradient_accumulation_steps * MEGABATCH_GLOBAL_BATCHES,
                seed=seed,
                rank=rank,
                world_size=world_size,
                collate_fn=collate_fn,
            )
        self.gas = gradient_accumulation_steps
        self.inner = InfiniteLoader(self.loader)

    def next(self) -> list[dict]:
        if len(self.loader) - self.inner.position < self.gas and self.inner.position > 0:
            self.inner.load_state_dict({"epoch": self.inner.epoch + 1, "position": 0})
        return [next(self.inner) for _ in range(self.gas)]

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    def state_dict(self) -> dict[str, int]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.inner.load_state_dict(state)


def _length_grouped_loader(
    ds, lengths, *, micro_batch_size, megabatch_steps, seed, rank, world_size, collate_fn
) -> DataLoader:
    _check_shard(micro_batch_size, rank, world_size)
    if len(lengths) != len(ds):
        raise DataError(
            f"group_by_length: {len(lengths)} lengths for a split of {len(ds)} rows; pass one "
            "length per row"
        )
    sampler = LengthGroupedSampler(
        lengths,
        micro_batch_size=micro_batch_size,
        megabatch_steps=megabatch_steps,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    return _sampled_loader(ds, sampler, micro_batch_size, True, collate_fn, seed)
