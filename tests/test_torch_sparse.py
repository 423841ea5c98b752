"""torch sparse gradients (`nn.Embedding(sparse=True)`) through AccumOptimizer.

The window is summed beside `.grad` as a coalesced sparse tensor (duplicate
rows add up) and handed on sparse; k micro-batches of b must equal one plain
step on batches of k*b, with `SparseAdam` and with `SGD`.
"""

from __future__ import annotations

import pytest
import torch

from keras_accum.torch import AccumOptimizer

K, B, N_UPDATES = 3, 4, 3
CLIP = 0.05  # below the merged gradients' norms: the clip acts


def _clip_by_global_norm(params, c):
    """The contract's global clip, `g * c / max(norm, c)` (torch's `clip_grad_norm_`
    has no sparse path and adds an epsilon)."""
    grads = [p.grad.coalesce() if p.grad.is_sparse else p.grad for p in params]
    norm = torch.sqrt(sum((g._values() if g.is_sparse else g).pow(2).sum() for g in grads))
    assert norm > c
    for p, g in zip(params, grads):
        p.grad = g * (c / torch.clamp(norm, min=c))


class _Net(torch.nn.Module):
    def __init__(self, dense: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(7, 4, sparse=True)
        self.head = torch.nn.Linear(4, 2) if dense else None

    def forward(self, ids):
        h = self.embedding(ids).mean(dim=1)
        return self.head(h) if self.head is not None else h[:, :2]


def _data():
    g = torch.Generator().manual_seed(3)
    n = N_UPDATES * K * B
    return torch.randint(0, 7, (n, 5), generator=g), torch.randn(n, 2, generator=g)


INNER = {
    "sparse_adam": (False, lambda params: torch.optim.SparseAdam(params, lr=0.05)),
    "sgd": (True, lambda params: torch.optim.SGD(params, lr=0.2)),
    "sgd_momentum": (True, lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9)),
}


@pytest.mark.parametrize("name", sorted(INNER))
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_sparse_embedding_gradients_equal_the_large_batch(name, weighted):
    dense, make = INNER[name]
    x, y = _data()
    model = _Net(dense)
    opt = AccumOptimizer(make(list(model.parameters())), merge_grad=K, global_clipnorm=CLIP)
    for i in range(N_UPDATES * K):
        s = slice(i * B, (i + 1) * B)
        torch.nn.functional.mse_loss(model(x[s]), y[s]).backward()
        assert model.embedding.weight.grad is None or model.embedding.weight.grad.is_sparse
        opt.step(weight=float(B) if weighted else None)
        opt.zero_grad()
    assert opt.iterations == N_UPDATES
    ref = _Net(dense)
    plain = make(list(ref.parameters()))
    for u in range(N_UPDATES):
        s = slice(u * K * B, (u + 1) * K * B)
        torch.nn.functional.mse_loss(ref(x[s]), y[s]).backward()
        assert ref.embedding.weight.grad.is_sparse
        _clip_by_global_norm(list(ref.parameters()), CLIP)
        plain.step()
        plain.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sparse_window_is_saved_and_resumed():
    x, y = _data()

    def run(model, opt, steps):
        for i in steps:
            s = slice(i * B, (i + 1) * B)
            torch.nn.functional.mse_loss(model(x[s]), y[s]).backward()
            opt.step()
            opt.zero_grad()

    full = _Net(False)
    full_opt = AccumOptimizer(torch.optim.SparseAdam(list(full.parameters()), lr=0.05), merge_grad=K)
    run(full, full_opt, range(2 * K))
    part = _Net(False)
    part_opt = AccumOptimizer(torch.optim.SparseAdam(list(part.parameters()), lr=0.05), merge_grad=K)
    run(part, part_opt, range(K + 1))  # a window open: 1 of K
    import io

    buffer = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": part_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _Net(False)
    resumed_opt = AccumOptimizer(
        torch.optim.SparseAdam(list(resumed.parameters()), lr=0.05), merge_grad=K
    )
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    run(resumed, resumed_opt, range(K + 1, 2 * K))
    assert resumed_opt.iterations == 2
    for a, b in zip(resumed.parameters(), full.parameters()):
        assert torch.equal(a, b)
