"""The pieces of the ZeRO-3 partitioned influence passes that need no process group: the
saved-tensor recipes (``_regathered``). The passes themselves, on 1 and 2 ranks:
``test_ds_equivalence.test_zero3_influence_passes_on_partitions_equal_the_full_passes``."""

import weakref

import torch

from lgtm_ds.engines.zero3_functional import _regathered


def test_regathered_graph_keeps_recipes_not_the_gathered_parameter():
    """A gathered parameter (here: a copy of a flat 'part' buffer, the weight a view of it)
    used by two ops, one through a transposed view: the graph must not keep its storage alive
    (a weak reference dies once the caller drops it), the backward re-gathers once per saved
    use, and the gradients equal the ones of an ordinary graph."""
    torch.manual_seed(0)
    flat = torch.randn(41, dtype=torch.float64)  # 5 x 7 weight + a padded tail
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)  # an activation

    def reference():
        leaf = flat.clone().requires_grad_()
        w = leaf.narrow(0, 0, 35).view(5, 7)
        y = x @ w.t()
        loss = (y.sin() * (w[:, :3] ** 2).sum()).sum()
        return torch.autograd.grad(loss, (leaf, x))

    leaf = flat.clone().requires_grad_()
    calls = []

    def again():
        calls.append(1)
        return flat.clone()  # "all-gather": the same values in a new buffer

    live = {}
    with _regathered(live):
        buf = leaf * 1  # the gathered flat buffer (new storage, with graph)
        w = buf.narrow(0, 0, 35).view(5, 7)
        live[w.untyped_storage().data_ptr()] = (weakref.ref(w), again)
        y = x @ w.t()  # saves a transposed view of w (for x's gradient)
        loss = (y.sin() * (w[:, :3] ** 2).sum()).sum()  # saves a strided view of w
    alive = weakref.ref(buf)
    del buf, w
    assert alive() is None, "the graph kept the gathered parameter alive"
    got = torch.autograd.grad(loss, (leaf, x))
    assert len(calls) == 2, f"{len(calls)} re-gathers, want one per saved use (2)"
    for a, b in zip(got, reference()):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_regathered_leaves_other_tensors_alone():
    """Activations and parameters not in ``live`` are saved as themselves (no re-gather)."""
    a = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    with _regathered({}):
        loss = (a @ a).exp().sum()
    (got,) = torch.autograd.grad(loss, a)
    b = a.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad((b @ b).exp().sum(), b)
    assert torch.equal(got, want)
