"""torch: sparse gradients (`nn.Embedding(sparse=True)`) through AccumOptimizer.

A window of sparse gradients is summed in a coalesced sparse side buffer
(duplicate rows add up) and handed to the inner optimizer sparse, so
`torch.optim.SparseAdam` works. The oracle is the same inner optimizer run
alone on the large batch: `merge_grad=k` on micro-batches of `b` equals one
plain step on `k*b` samples (contract points 3, 7 and 9), also with
per-micro-step weights on unequal micro-batches, with `reduction="sum"` on sum
losses, and with global clipping and EMA (applied to the large batch here by
their formulas). Plain torch accumulation in `.grad` would append every
micro-batch's rows, duplicates included, and `SparseAdam` would coalesce them
only at its step.
"""

from __future__ import annotations

import io

import pytest
import torch

from keras_accum.torch import AccumOptimizer

VOCAB, DIM, BAG = 7, 4, 5
CLIP = 0.05  # below the merged gradients' norms here: the clip acts
EMA = 0.9
CLIP_VALUE = 0.02  # below the largest merged gradient entries here
N_UPDATES = 2


class _Net(torch.nn.Module):
    """A bag of embeddings (rows repeat inside a micro-batch), with a dense head or not."""

    def __init__(self, head: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(VOCAB, DIM, sparse=True)
        self.head = torch.nn.Linear(DIM, 2) if head else None

    def forward(self, ids):
        h = self.embedding(ids).mean(dim=1)
        return self.head(h) if self.head is not None else h[:, :2]


#: name -> (dense head, inner optimizer factory). SparseAdam takes sparse
#: gradients only, so its net has no dense head.
INNER = {
    "sparse_adam": (False, lambda ps: torch.optim.SparseAdam(ps, lr=0.05)),
    "sgd_momentum": (True, lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9)),
}

#: name -> (micro-batch sizes of one window, AccumOptimizer kwargs, weighted).
VARIANTS = {
    "mean": ([4, 4, 4], {}, False),
    "weighted_unequal": ([2, 5, 3], {}, True),
    "sum": ([4, 4, 4], {"reduction": "sum"}, False),
    "clip_ema": ([4, 4, 4], {"global_clipnorm": CLIP, "use_ema": True, "ema_momentum": EMA}, False),
    "float64_buffer": ([4, 4, 4], {"accumulator_dtype": torch.float64}, False),
    "clipvalue_clipnorm": ([4, 4, 4], {"clipvalue": CLIP_VALUE, "clipnorm": CLIP}, False),
}


def _data(sizes):
    g = torch.Generator().manual_seed(3)
    n = N_UPDATES * sum(sizes)
    return torch.randint(0, VOCAB, (n, BAG), generator=g), torch.randn(n, 2, generator=g)


def _loss(model, x, y, reduction):
    return torch.nn.functional.mse_loss(model(x), y, reduction=reduction)


def _windows(sizes):
    """Micro-batch slices, window by window."""
    start, out = 0, []
    for _ in range(N_UPDATES):
        window = []
        for n in sizes:
            window.append(slice(start, start + n))
            start += n
        out.append(window)
    return out


def _clip_by_global_norm(params, c):
    """The contract's `g * c / max(||g||, c)` on the large batch's gradients."""
    grads = [p.grad.coalesce() if p.grad.is_sparse else p.grad for p in params]
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g._values() if g.is_sparse else g) for g in grads])
    )
    for p, g in zip(params, grads):
        p.grad = g * (c / torch.clamp(norm, min=c))
    return norm


def _clip_each(params, value, norm):
    """The contract's clipvalue, then per-variable clipnorm, on the large batch's gradients."""
    norm_clipped = False
    for p in params:
        g = p.grad.coalesce() if p.grad.is_sparse else p.grad
        v = g._values() if g.is_sparse else g
        assert v.abs().max() > value  # the value clip acts
        v.clamp_(-value, value)
        n = torch.linalg.vector_norm(v)
        norm_clipped |= bool(n > norm)
        v.mul_(norm / torch.clamp(n, min=norm))
        p.grad = g
    assert norm_clipped  # and the norm clip, on the embedding at least


def _accumulated(name, variant):
    head, make = INNER[name]
    sizes, kwargs, weighted = VARIANTS[variant]
    reduction = "sum" if kwargs.get("reduction") == "sum" else "mean"
    x, y = _data(sizes)
    model = _Net(head)
    opt = AccumOptimizer(make(list(model.parameters())), merge_grad=len(sizes), **kwargs)
    norms = []
    for window in _windows(sizes):
        for s in window:
            _loss(model, x[s], y[s], reduction).backward()
            assert model.embedding.weight.grad.is_sparse
            opt.step(weight=float(s.stop - s.start) if weighted else None)
            opt.zero_grad()
        norms.append(opt.last_grad_norm)
    assert opt.iterations == N_UPDATES
    return model, opt, norms


def _large_batch(name, variant):
    head, make = INNER[name]
    sizes, kwargs, _ = VARIANTS[variant]
    reduction = "sum" if kwargs.get("reduction") == "sum" else "mean"
    x, y = _data(sizes)
    model = _Net(head)
    params = list(model.parameters())
    plain = make(params)
    ema, norms = None, []
    for window in _windows(sizes):
        s = slice(window[0].start, window[-1].stop)
        _loss(model, x[s], y[s], reduction).backward()
        if "global_clipnorm" in kwargs:
            norms.append(_clip_by_global_norm(params, CLIP))
        if "clipvalue" in kwargs:
            _clip_each(params, CLIP_VALUE, CLIP)
        plain.step()
        plain.zero_grad()
        now = [p.detach().clone() for p in params]
        ema = now if ema is None else [EMA * e + (1 - EMA) * p for e, p in zip(ema, now)]
    return model, ema, norms


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(INNER))
def test_sparse_gradients_equal_the_large_batch(name, variant):
    model, opt, norms = _accumulated(name, variant)
    ref, ref_ema, ref_norms = _large_batch(name, variant)
    for got, want in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Handed on sparse: the inner optimizer's step ran on a sparse `.grad`
    # (SparseAdam refuses anything else), and the window left no buffer.
    assert not any("accumulator" in st for st in opt.state.values())
    if VARIANTS[variant][1].get("use_ema"):
        for p, want in zip(model.parameters(), ref_ema):
            torch.testing.assert_close(opt.state[p]["ema"], want, rtol=1e-5, atol=1e-6)
        for got, want in zip(norms, ref_norms):
            assert got > CLIP  # the clip acted
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sparse_window_is_coalesced_and_bounded_by_distinct_rows():
    model = _Net(head=False)
    opt = AccumOptimizer(torch.optim.SparseAdam(model.parameters(), lr=0.05), merge_grad=4)
    ids = torch.tensor([[1, 1, 2, 2, 2]])
    for _ in range(3):
        model(ids).sum().backward()
        opt.step()
    acc = opt.state[model.embedding.weight]["accumulator"]
    assert acc.is_sparse and acc.is_coalesced()
    assert acc._nnz() == 2  # 15 looked-up rows, 2 distinct ones
    assert model.embedding.weight.grad is None  # moved into the buffer
    # Row 1 gets 2 lookups per micro-step out of 5, weight 1/5 each, on the
    # first two output columns: 3 micro-steps sum to 3 * 2 / 5.
    dense = acc.to_dense()
    torch.testing.assert_close(dense[1, :2], torch.full((2,), 1.2))
    torch.testing.assert_close(dense[2, :2], torch.full((2,), 1.8))
    assert dense[[0, 3, 4, 5, 6]].abs().sum() == 0


def test_sparse_nonfinite_skip_and_raise():
    ids = torch.tensor([[1, 2, 2, 3, 4]])

    def poisoned(model):
        out = model(ids)
        return (out * torch.tensor([[float("nan"), 1.0]])).sum()

    model = _Net(head=False)
    before = model.embedding.weight.detach().clone()
    opt = AccumOptimizer(torch.optim.SparseAdam(model.parameters(), lr=0.05), merge_grad=2)
    model(ids).sum().backward()
    opt.step()
    poisoned(model).backward()
    opt.step()
    assert opt.skipped_updates == 1 and opt.iterations == 0
    assert torch.equal(model.embedding.weight, before)
    assert not opt.state.get(model.embedding.weight)  # the next window starts clean

    raising = AccumOptimizer(
        torch.optim.SparseAdam(model.parameters(), lr=0.05), merge_grad=2, on_nonfinite="raise"
    )
    poisoned(model).backward()
    with pytest.raises(FloatingPointError, match="micro-step 1"):
        raising.step()
    assert raising.micro_steps == 0 and not raising.state.get(model.embedding.weight)


def test_sparse_mid_window_state_dict_resumes_bit_identically():
    x, y = _data([4, 4, 4])

    def micro(model, opt, i):
        s = slice(4 * i, 4 * i + 4)
        _loss(model, x[s], y[s], "mean").backward()
        opt.step()
        opt.zero_grad()

    def build():
        model = _Net(head=True)
        opt = AccumOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), merge_grad=3, use_ema=True
        )
        return model, opt

    model, opt = build()
    for i in range(5):  # one update, then two micro-steps of the second window
        micro(model, opt, i)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    assert opt.state_dict()["state"][0]["accumulator"].is_sparse
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, resumed_opt = build()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    for i in range(5, 6):
        micro(model, opt, i)
        micro(resumed, resumed_opt, i)
    assert resumed_opt.iterations == opt.iterations == 2
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["ema"], resumed_opt.state[b]["ema"])


def test_sparse_gradients_refuse_no_sync():
    class _FakeDDP(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, ids):
            return self.net(ids)

        def no_sync(self):
            import contextlib

            return contextlib.nullcontext()

    model = _FakeDDP(_Net(head=False))
    opt = AccumOptimizer(torch.optim.SparseAdam(model.parameters(), lr=0.05), merge_grad=2)
    with opt.no_sync(model):
        model(torch.tensor([[1, 2, 2, 3, 4]])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient.*no_sync"):
        opt.step()
    assert opt.micro_steps == 0 and not opt.state.get(model.net.embedding.weight)


@pytest.mark.filterwarnings("ignore:GradScaler is going to stop:FutureWarning")
def test_sparse_window_under_grad_scaler_equals_the_unscaled_run():
    x, y = _data([4, 4, 4])

    def run(scaled):
        model = _Net(head=False)
        opt = AccumOptimizer(torch.optim.SparseAdam(model.parameters(), lr=0.05), merge_grad=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for i in range(6):
            loss = _loss(model, x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4], "mean")
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad()
        return model, opt

    scaled, scaled_opt = run(True)
    plain, plain_opt = run(False)
    assert scaled_opt.iterations == plain_opt.iterations == 2
    # Powers-of-two scales: unscaling the sparse values is exact.
    assert torch.equal(scaled.embedding.weight, plain.embedding.weight)


def test_a_resumed_sparse_window_meets_the_next_micro_step_as_the_uninterrupted_one():
    """After `load_state_dict` of a window held beside `.grad` (sparse), the
    next micro-step must go through the same accumulation path as in the
    optimizer that was never saved: here a dense gradient for the embedding
    (its weight also used densely), which neither may drop silently."""

    def make():
        torch.manual_seed(0)
        emb = torch.nn.Embedding(5, 3, sparse=True)
        lin = torch.nn.Linear(3, 1)
        params = list(emb.parameters()) + list(lin.parameters())
        return emb, lin, AccumOptimizer(torch.optim.SGD(params, lr=1.0), merge_grad=3)

    def outcome(emb, lin, opt):
        lin(emb.weight).sum().backward()  # dense gradient for the embedding weight
        try:
            opt.step()
            lin(emb(torch.tensor([0, 1]))).sum().backward()
            opt.step()
        except RuntimeError as e:
            return type(e).__name__
        return [p.detach().clone() for p in (emb.weight, lin.weight, lin.bias)]

    emb, lin, opt = make()
    lin(emb(torch.tensor([0, 1]))).sum().backward()
    opt.step()
    saved = (
        opt.state_dict(),
        {k: v.clone() for k, v in emb.state_dict().items()},
        {k: v.clone() for k, v in lin.state_dict().items()},
    )
    expected = outcome(emb, lin, opt)
    emb2, lin2, opt2 = make()
    emb2.load_state_dict(saved[1])
    lin2.load_state_dict(saved[2])
    opt2.load_state_dict(saved[0])
    got = outcome(emb2, lin2, opt2)
    if isinstance(expected, str):
        assert got == expected
    else:
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_sparse_grad_left_on_a_parameter_across_a_load_is_not_taken_for_dense():
    # A backward through the embedding ran before a mid-window load whose
    # saved window never touched it: its sparse `.grad` stays on the parameter
    # (a side-buffered one), and the next micro-steps must treat it as sparse.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    lin = torch.nn.Linear(4, 3)
    params = list(emb.parameters()) + list(lin.parameters())
    idx = torch.tensor([1, 2, 3])
    saved = AccumOptimizer(torch.optim.SGD(params, lr=0.1), merge_grad=2)
    lin(torch.ones(3, 4)).sum().backward()
    saved.step()
    state = saved.state_dict()
    for p in params:
        p.grad = None
    before = emb.weight.detach().clone()
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1), merge_grad=2)
    lin(emb(idx)).sum().backward()
    opt.load_state_dict(state)
    assert emb.weight.grad.is_sparse
    lin(emb(idx)).sum().backward()
    opt.step()  # closes the window
    assert opt.iterations == 1 and opt.skipped_updates == 0
    moved = (emb.weight.detach() != before).any(dim=1)
    assert moved.tolist() == [i in (1, 2, 3) for i in range(10)]


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # torch's Adagrad
@pytest.mark.parametrize("kwargs", [{}, {"on_nonfinite": "raise"}, {"use_ema": True}])
@pytest.mark.parametrize("inner", ["sgd", "adagrad", "sparse_adam"])
def test_merge1_hands_a_sparse_gradient_on_as_it_came(inner, kwargs):
    """docs/semantics.md, point 1: merge_grad=1 is bit-identical to the inner optimizer alone.

    A sparse gradient with duplicate rows is handed on uncoalesced, as
    autograd made it; coalescing it first rounded the duplicates' sum
    differently (2.4e-7 apart in float32 with plain SGD).
    """
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
        "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
        "sparse_adam": lambda ps: torch.optim.SparseAdam(ps, lr=0.1),
    }[inner]
    torch.manual_seed(0)
    ours = torch.nn.Embedding(50, 8, sparse=True)
    plain = torch.nn.Embedding(50, 8, sparse=True)
    plain.load_state_dict(ours.state_dict())
    opt = AccumOptimizer(make(list(ours.parameters())), merge_grad=1, **kwargs)
    ref = make(list(plain.parameters()))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        ids = torch.randint(0, 5, (200,), generator=g)  # many duplicate rows
        upstream = torch.randn(200, 8, generator=g)
        for module, o in ((ours, opt), (plain, ref)):
            (module(ids) * upstream).sum().backward()
            assert not module.weight.grad.is_coalesced()
            o.step()
            o.zero_grad()
        assert torch.equal(ours.weight, plain.weight)
    assert opt.iterations == 5
