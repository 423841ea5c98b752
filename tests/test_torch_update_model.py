"""keras_accum.torch.update_model and apply_deferred (FastEstimator's entry points).

The FastEstimator docs' LeNet examples (r1.2 gradients form, r1.1 loss form)
against the NumPy oracle and a plain large-batch run; the GAN that needs
`defer=True`; the `merge_grad` cadence of UpdateOp; GradScaler with both
forms; every bad input with nothing changed.
"""

from __future__ import annotations

import copy
import gc
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import keras_accum.torch  # noqa: F401 (first: keras_accum then loads without TensorFlow)
from keras_accum.torch import AccumOptimizer, apply_deferred, attach_optimizer, update_model

try:  # tests/ on sys.path (pytest's default "prepend" import mode)
    import reference as ref
except ImportError:  # tests/ as a package
    from tests import reference as ref


class LeNet(torch.nn.Module):
    """FastEstimator's torch LeNet, with fewer channels (28x28x1 in, softmax out)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3)
        self.conv2 = torch.nn.Conv2d(8, 16, 3)
        self.conv3 = torch.nn.Conv2d(16, 16, 3)
        self.fc1 = torch.nn.Linear(3 * 3 * 16, 32)
        self.fc2 = torch.nn.Linear(32, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x)).flatten(1)
        return F.softmax(self.fc2(F.relu(self.fc1(x))), dim=-1)


def sparse_categorical_crossentropy(y_pred, y_true):
    """Per-sample loss on probabilities, as `fe.backend.sparse_categorical_crossentropy`."""
    return F.nll_loss(torch.log(y_pred.clamp_min(1e-7)), y_true, reduction="none")


def lenet(seed=0):
    torch.manual_seed(seed)
    return LeNet()


def batches(n, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)
    ]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def numpy_params(model):
    return [p.detach().numpy().copy() for p in trainable(model)]


# -- the FastEstimator docs' examples ------------------------------------------------


def test_fe_docs_example_gradients_form():
    """r1.2: `update_model(m, gradients=...)`, FE's own example, one update."""
    m = lenet()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    attach_optimizer(m, opt)
    x = torch.ones((3, 1, 28, 28))  # (batch, channels, height, width)
    y = torch.tensor((1, 0, 1))
    pred = m(x)  # [[~0.1, ...], ...]
    loss = sparse_categorical_crossentropy(y_pred=pred, y_true=y)  # ~2.3
    assert 2.0 < float(loss.mean().detach()) < 2.6
    gradients = torch.autograd.grad(loss.mean(), [p for p in m.parameters() if p.requires_grad])
    expected = [p - 0.1 * g.numpy() for p, g in zip(numpy_params(m), gradients)]
    update_model(m, gradients=gradients)
    for got, want in zip(numpy_params(m), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_lenet_gradients_form_merge_grad_matches_oracle():
    """Four calls with merge_grad=2 and SGD(momentum): RefAccum(RefSGD) on the same gradients."""
    m = lenet()
    attach_optimizer(
        m, AccumOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), merge_grad=2)
    )
    oracle = ref.RefAccum(numpy_params(m), ref.RefSGD(0.1, momentum=0.9), merge_grad=2)
    for x, y in batches(4, 3):
        loss = sparse_categorical_crossentropy(m(x), y).mean()
        grads = torch.autograd.grad(loss, trainable(m))
        update_model(m, gradients=list(grads))
        oracle.step([g.numpy() for g in grads])
    assert oracle.iterations == 2
    for got, want in zip(numpy_params(m), oracle.params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lenet_loss_form_merge_grad_equals_large_batch():
    """r1.1: `update_model(m, loss=per_sample_loss)`, merge_grad=2 on batches of 3 = Adam on 6."""
    m = lenet()
    big = copy.deepcopy(m)
    attach_optimizer(m, AccumOptimizer(torch.optim.Adam(m.parameters(), lr=1e-2), merge_grad=2))
    plain = torch.optim.Adam(big.parameters(), lr=1e-2)
    data = batches(4, 3)
    for x, y in data:
        update_model(m, loss=sparse_categorical_crossentropy(m(x), y))
    for i in range(0, 4, 2):
        x = torch.cat([data[i][0], data[i + 1][0]])
        y = torch.cat([data[i][1], data[i + 1][1]])
        sparse_categorical_crossentropy(big(x), y).mean().backward()
        plain.step()
        plain.zero_grad()
    # Adam divides by sqrt(v): where a gradient is nearly zero, float32
    # round-off in the sum is magnified, up to ~1e-3 of a step (lr=1e-2).
    for got, want in zip(m.parameters(), big.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_merge_grad_only_every_kth_call_updates():
    """UpdateOp: for every merge_grad calls, only the last one updates the model."""
    m = torch.nn.Linear(3, 2)
    opt = AccumOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), merge_grad=3)
    x = torch.randn(4, 3)
    before = [p.detach().clone() for p in m.parameters()]
    for call in range(1, 4):
        update_model(m, loss=m(x).pow(2).mean(), optimizer=opt)
        unchanged = all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
        assert unchanged == (call < 3), call
    assert (opt.micro_steps, opt.iterations) == (3, 1)


def test_plain_optimizer_updates_at_every_call_and_clears_grad():
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    for _ in range(2):
        before = [p.detach().clone() for p in m.parameters()]
        update_model(m, loss=m(x).pow(2).mean(), optimizer=opt)
        assert not any(torch.equal(p, b) for p, b in zip(m.parameters(), before))
        assert all(p.grad is None for p in m.parameters())


def test_frozen_parameters_are_left_out_and_none_gradients_skip():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    m[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    frozen = m[0].weight.detach().clone()
    bias0 = m[0].bias.detach().clone()
    grads = [None, torch.ones(2, 4), torch.ones(2)]  # bias0, weight1, bias1
    update_model(m, gradients=grads, optimizer=opt)
    assert torch.equal(m[0].weight, frozen)
    assert torch.equal(m[0].bias, bias0)  # None: no gradient, no move


def test_optimizer_argument_wins_over_the_attached_one():
    m = torch.nn.Linear(2, 1)
    attached = torch.optim.SGD(m.parameters(), lr=0.0)
    given = torch.optim.SGD(m.parameters(), lr=1.0)
    attach_optimizer(m, attached)
    before = m.weight.detach().clone()
    update_model(m, gradients=[torch.ones(1, 2), torch.ones(1)], optimizer=given)
    torch.testing.assert_close(m.weight.detach(), before - 1.0)


def test_attaching_adds_nothing_to_the_module():
    m = torch.nn.Linear(2, 1)
    keys = set(vars(m))
    attach_optimizer(m, torch.optim.SGD(m.parameters(), lr=0.1))
    assert set(vars(m)) == keys
    clone = copy.deepcopy(m)
    with pytest.raises(ValueError, match="has no optimizer"):
        update_model(clone, gradients=[torch.ones(1, 2), torch.ones(1)])


# -- defer: the GAN -------------------------------------------------------------------


def _gan(seed=0):
    torch.manual_seed(seed)
    gen = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    disc = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    g = torch.Generator().manual_seed(seed + 1)
    z, real = torch.randn(5, 2, generator=g), torch.randn(5, 3, generator=g)
    return gen, disc, z, real


def _gan_losses(gen, disc, z, real):
    """Least-squares GAN: the generator's loss runs through the discriminator."""
    fake = gen(z)
    g_loss = (disc(fake) - 1).pow(2).mean()
    d_loss = (disc(real) - 1).pow(2).mean() + disc(fake.detach()).pow(2).mean()
    return g_loss, d_loss


LR = 0.1


def test_gan_deferring_both_equals_both_gradients_before_any_update():
    gen, disc, z, real = _gan()
    # The oracle: both gradients first, then SGD by hand.
    g_loss, d_loss = _gan_losses(gen, disc, z, real)
    g_grads = torch.autograd.grad(g_loss, trainable(gen))
    d_grads = torch.autograd.grad(d_loss, trainable(disc))
    want_g = [p.detach() - LR * g for p, g in zip(trainable(gen), g_grads)]
    want_d = [p.detach() - LR * g for p, g in zip(trainable(disc), d_grads)]

    attach_optimizer(gen, torch.optim.SGD(gen.parameters(), lr=LR))
    attach_optimizer(disc, torch.optim.SGD(disc.parameters(), lr=LR))
    deferred = {}
    g_loss, d_loss = _gan_losses(gen, disc, z, real)
    update_model(gen, loss=g_loss, defer=True, deferred=deferred)
    update_model(disc, loss=d_loss, defer=True, deferred=deferred)
    # Nothing moved yet, and the discriminator's .grad was not touched by g_loss.
    assert all(p.grad is None for p in disc.parameters())
    assert list(deferred) == [gen, disc]
    assert apply_deferred(deferred) == 2
    assert deferred == {}
    for got, want in zip(trainable(gen) + trainable(disc), want_g + want_d):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)


def test_gan_updating_the_discriminator_first_raises_and_suggests_defer():
    gen, disc, z, real = _gan()
    g_opt = torch.optim.SGD(gen.parameters(), lr=LR, momentum=0.9)
    attach_optimizer(gen, g_opt)
    attach_optimizer(disc, torch.optim.SGD(disc.parameters(), lr=LR))
    g_loss, d_loss = _gan_losses(gen, disc, z, real)
    update_model(disc, loss=d_loss)  # changes the discriminator's weights in place
    before = [p.detach().clone() for p in gen.parameters()]
    deferred = {}
    with pytest.raises(RuntimeError, match=r"(?s)in-place.*defer=True.*apply_deferred") as info:
        update_model(gen, loss=g_loss, defer=True, deferred=deferred)
    assert "modified by an inplace operation" in str(info.value.__cause__)
    assert all(torch.equal(p, b) for p, b in zip(gen.parameters(), before))
    assert all(p.grad is None for p in gen.parameters())
    assert g_opt.state_dict()["state"] == {} and deferred == {}


def test_gan_with_accum_optimizers_deferred_equals_oracle():
    """Two steps of the deferred GAN with merge_grad=2: one update each, on the mean."""
    gen, disc, z, real = _gan()
    g_oracle = ref.RefAccum(numpy_params(gen), ref.RefSGD(LR), merge_grad=2)
    d_oracle = ref.RefAccum(numpy_params(disc), ref.RefSGD(LR), merge_grad=2)
    attach_optimizer(gen, AccumOptimizer(torch.optim.SGD(gen.parameters(), lr=LR), merge_grad=2))
    attach_optimizer(disc, AccumOptimizer(torch.optim.SGD(disc.parameters(), lr=LR), merge_grad=2))
    for step in range(2):
        zs = z + step  # another batch
        g_loss, d_loss = _gan_losses(gen, disc, zs, real)
        g_oracle.step([g.numpy() for g in torch.autograd.grad(g_loss, trainable(gen))])
        d_oracle.step([g.numpy() for g in torch.autograd.grad(d_loss, trainable(disc))])
        deferred = {}
        g_loss, d_loss = _gan_losses(gen, disc, zs, real)
        update_model(gen, loss=g_loss, defer=True, deferred=deferred)
        update_model(disc, loss=d_loss, defer=True, deferred=deferred)
        apply_deferred(deferred)
    for got, want in zip(numpy_params(gen) + numpy_params(disc), g_oracle.params + d_oracle.params):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_deferred_gradients_are_copied_at_call_time():
    m = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    grads = [torch.ones(1, 2), torch.ones(1)]
    before = m.weight.detach().clone()
    deferred = {}
    update_model(m, gradients=grads, optimizer=opt, defer=True, deferred=deferred)
    grads[0].mul_(100.0)  # the caller reuses its buffer
    apply_deferred(deferred)
    torch.testing.assert_close(m.weight.detach(), before - 1.0)


def test_each_deferred_call_is_one_micro_step():
    m = torch.nn.Linear(2, 1)
    opt = AccumOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), merge_grad=2)
    deferred = {}
    x = torch.randn(3, 2)
    for _ in range(3):
        update_model(m, loss=m(x).pow(2).mean(), optimizer=opt, defer=True, deferred=deferred)
    assert len(deferred[m]) == 3 and opt.micro_steps == 0
    apply_deferred(deferred)
    assert (opt.micro_steps, opt.iterations, opt.window_steps) == (3, 1, 1)


# -- apply_deferred (framework-free) -------------------------------------------------


def test_apply_deferred_order_and_partial_failure():
    calls = []
    a, b = object(), object()

    def boom():
        raise KeyError("boom")

    deferred = {a: [lambda: calls.append("a1"), lambda: calls.append("a2")], b: []}
    deferred[b] += [boom, lambda: calls.append("b2")]
    with pytest.raises(KeyError):
        apply_deferred(deferred)
    assert calls == ["a1", "a2"]
    assert list(deferred) == [b] and len(deferred[b]) == 1  # b2 still pending
    assert apply_deferred(deferred) == 1 and calls[-1] == "b2" and deferred == {}


@pytest.mark.parametrize(
    "bad, error",
    [(None, TypeError), ([lambda: None], TypeError), ({"m": lambda: None}, TypeError),
     ({"m": [1]}, TypeError)],
    ids=["none", "list", "callable-not-in-list", "not-callable"],
)
def test_apply_deferred_bad_input(bad, error):
    with pytest.raises(error, match="deferred"):
        apply_deferred(bad)


# -- mixed precision ------------------------------------------------------------------


def _scaled_run(form):
    """Two updates (merge_grad=2) with a CPU GradScaler; `form` picks how gradients come."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = AccumOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), merge_grad=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if form != "none" else None
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
        loss = (m(x) - y).pow(2).mean(dim=1)
        if form == "gradients":
            grads = torch.autograd.grad(scaler.scale(loss.mean()), trainable(m))
            update_model(m, gradients=list(grads), scaler=scaler, optimizer=opt)
        else:
            update_model(m, loss=loss, scaler=scaler, optimizer=opt)
        if scaler is not None:
            scaler.update()
    return m, opt, scaler


def test_grad_scaler_loss_and_scaled_gradients_equal_the_unscaled_run():
    """Precomputed gradients are taken in the scaler's scale (of `scaler.scale(loss)`)."""
    plain, _, _ = _scaled_run("none")
    for form in ("loss", "gradients"):
        m, opt, scaler = _scaled_run(form)
        assert opt.iterations == 2 and opt.skipped_updates == 0
        assert scaler.get_scale() == 2.0**10  # fixed inside windows, no overflow
        for got, want in zip(m.parameters(), plain.parameters()):
            assert torch.equal(got, want), form  # power-of-two scale: exact


# -- bad input: a clear error, nothing changed ----------------------------------------


def _bad_setup():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = AccumOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), merge_grad=2)
    attach_optimizer(m, opt)
    x = torch.randn(4, 3)
    update_model(m, loss=m(x).pow(2).mean())  # an open window in .grad
    return m, opt, x


BAD = {
    "model-not-a-module": (
        lambda m, x: dict(model=[m], loss=m(x).sum()), TypeError, "`model` must be a `torch.nn.Module`"
    ),
    "no-optimizer": (
        lambda m, x: dict(model=torch.nn.Linear(3, 2), gradients=[torch.ones(2, 3), torch.ones(2)]),
        ValueError,
        "has no optimizer",
    ),
    "optimizer-misses-parameters": (
        lambda m, x: dict(model=m, loss=m(x).sum(), optimizer=torch.optim.SGD([m.bias], lr=0.1)),
        ValueError,
        "must hold every trainable parameter",
    ),
    "optimizer-wrong-kind": (
        lambda m, x: dict(model=m, loss=m(x).sum(), optimizer="sgd"), TypeError, "`optimizer` must"
    ),
    "gradients-too-few": (
        lambda m, x: dict(model=m, gradients=[torch.ones(2, 3)]), ValueError, "Received: 1 gradients"
    ),
    "gradients-wrong-shape": (
        lambda m, x: dict(model=m, gradients=[torch.ones(2, 3), torch.ones(3)]),
        ValueError,
        r"`gradients\[1\]` must have the shape of parameter 1, \(2,\)",
    ),
    "gradient-wrong-kind": (
        lambda m, x: dict(model=m, gradients=[np.ones((2, 3)), torch.ones(2)]),
        TypeError,
        r"`gradients\[0\]` must be a torch.Tensor",
    ),
    "gradients-not-a-list": (
        lambda m, x: dict(model=m, gradients=torch.ones(2, 3)), TypeError, "must be a list"
    ),
    "both": (
        lambda m, x: dict(model=m, loss=m(x).sum(), gradients=[torch.ones(2, 3), torch.ones(2)]),
        ValueError,
        "Exactly one of `gradients` and `loss`",
    ),
    "neither": (lambda m, x: dict(model=m), ValueError, "Exactly one of `gradients` and `loss`"),
    "defer-without-deferred": (
        lambda m, x: dict(model=m, loss=m(x).sum(), defer=True),
        TypeError,
        "`deferred` must be a dict when `defer=True`",
    ),
    "defer-not-bool": (lambda m, x: dict(model=m, loss=m(x).sum(), defer=1), TypeError, "`defer`"),
    "loss-without-grad": (
        lambda m, x: dict(model=m, loss=m(x).sum().detach()), ValueError, "must require grad"
    ),
    "loss-not-a-tensor": (lambda m, x: dict(model=m, loss=1.0), TypeError, "`loss` must be"),
    "loss-not-from-model": (
        lambda m, x: dict(model=m, loss=torch.ones(1, requires_grad=True).sum()),
        ValueError,
        "does not depend on any trainable parameter",
    ),
    "scaler-wrong-kind": (
        lambda m, x: dict(model=m, loss=m(x).sum(), scaler=object()), TypeError, "`scaler`"
    ),
    "retain-graph-not-bool": (
        lambda m, x: dict(model=m, loss=m(x).sum(), retain_graph=None), TypeError, "`retain_graph`"
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_and_changes_nothing(case):
    make, error, message = BAD[case]
    m, opt, x = _bad_setup()
    kwargs = make(m, x)
    kwargs.setdefault("deferred", {} if "defer" not in kwargs else None)
    deferred = kwargs["deferred"]
    params = [p.detach().clone() for p in m.parameters()]
    grads = [p.grad.clone() for p in m.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=message):
        update_model(**kwargs)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), params))
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads))
    after = opt.state_dict()
    assert after["accum"]["micro_steps"] == state["accum"]["micro_steps"]
    assert after["inner"]["state"] == state["inner"]["state"]
    assert deferred in (None, {})


def test_fe_migration_doc_torch_after_code_runs():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                        "migration.md")
    with open(path, encoding="utf-8") as f:
        section = f.read().split("## From FastEstimator", 1)[1].split("\n## ", 1)[0]
    blocks = [
        code
        for directive, code in re.findall(r"(<!--[^\n]*-->\n)?```python\n(.*?)```", section, re.S)
        if not code.startswith("# needs:") and "import torch" in code
    ]
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/migration.md", "exec"), {"__name__": "__doc__"})


def test_ddp_module_refuses_the_loss_form_and_steps_with_gradients():
    """torch.autograd.grad would bypass DDP's all-reduce: the loss form says so."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        before = [p.detach().clone() for p in ddp.parameters()]
        with pytest.raises(RuntimeError, match="DistributedDataParallel.*no_sync"):
            update_model(ddp, loss=ddp(torch.randn(4, 3)).pow(2).mean(), optimizer=opt)
        assert all(torch.equal(p, b) for p, b in zip(ddp.parameters(), before))
        assert all(p.grad is None for p in ddp.parameters())
        update_model(ddp, gradients=[torch.ones(2, 3), torch.ones(2)], optimizer=opt)
        for p, b in zip(ddp.parameters(), before):
            torch.testing.assert_close(p.detach(), b - 0.1)
    finally:
        # DDP must not be the group's last owner: see _ddp_bucket_view_worker
        # in test_torch_hardening.py.
        ddp = opt = None
        gc.collect()
        dist.destroy_process_group()
