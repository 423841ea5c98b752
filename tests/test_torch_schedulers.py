"""LR schedulers and GradScaler advance once per update, in the plain torch loop.

Each scheduler is built on the wrapper and stepped every micro-step; the
reference is the same scheduler on a plain optimizer stepped once per large
batch (docs/semantics.md, point 5: a schedule sees 0, 1, 2, ... at the 1st, 2nd, 3rd
update). GradScaler runs on CPU (`torch.amp.GradScaler("cpu")`): scales are
powers of two, so a scaled run must equal the unscaled one bit for bit.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.optim import lr_scheduler as S
from torch.optim.swa_utils import SWALR

from keras_accum.torch import AccumOptimizer

# GradScaler's protocol FutureWarning is hidden inside `scaler.step(opt)` for
# our optimizers only, so users never see it: make it an error here.
pytestmark = pytest.mark.filterwarnings("error:GradScaler is going to stop:FutureWarning")

K = 3  # merge_grad
N_UPDATES = 5

SCHEDULERS = {
    "StepLR": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[1, 3], gamma=0.5),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=2),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.25, total_iters=3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.7),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=4, power=2.0),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=4),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda e: 0.9),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
    # OneCycleLR raises if stepped more than total_steps times.
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=N_UPDATES),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=2),
    "SequentialLR": lambda o: S.SequentialLR(
        o,
        [S.ConstantLR(o, factor=0.5, total_iters=2), S.ExponentialLR(o, gamma=0.7)],
        milestones=[2],
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler(
        [S.ConstantLR(o, factor=0.5, total_iters=2), S.ExponentialLR(o, gamma=0.7)]
    ),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "SWALR": lambda o: SWALR(o, swa_lr=0.05, anneal_epochs=2),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _batch(i: int, n: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def _sched_step(sched) -> None:
    if isinstance(sched, S.ReduceLROnPlateau):
        sched.step(1.0)  # never improves: reduces after every `patience + 1` steps
    else:
        sched.step()


def _lr(opt) -> list:
    return [float(g["lr"]) for g in opt.param_groups]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_advances_once_per_update(name):
    big = _model()
    small = copy.deepcopy(big)
    plain = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    plain_sched = SCHEDULERS[name](plain)
    opt = AccumOptimizer(torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9), merge_grad=K)
    sched = SCHEDULERS[name](opt)
    assert _lr(opt) == _lr(plain)
    expected, actual = [], []
    for u in range(N_UPDATES):
        x, y = _batch(u, 4 * K)
        torch.nn.functional.mse_loss(big(x), y).backward()
        plain.step()
        _sched_step(plain_sched)
        plain.zero_grad()
        expected.append(_lr(plain))
        for k in range(K):
            lr_before = _lr(opt)
            xs, ys = x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]
            torch.nn.functional.mse_loss(small(xs), ys).backward()
            opt.step()
            _sched_step(sched)
            opt.zero_grad()
            if k < K - 1:
                assert _lr(opt) == lr_before  # held on a non-update micro-step
        actual.append(_lr(opt))
        # The inner optimizer sees the scheduler's LR (shared param groups).
        assert _lr(opt.inner_optimizer) == actual[-1]
    assert actual == expected
    assert len(set(map(tuple, expected))) > 1  # the schedule did move
    for a, e in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def _run_micro_steps(model, opt, n, sched=None, start=0, bad_at=()):
    for i in range(start, start + n):
        x, y = _batch(i, 4)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if i in bad_at:
            loss = loss * math.inf
        loss.backward()
        opt.step()
        if sched is not None:
            _sched_step(sched)
        opt.zero_grad()


def test_epoch_level_scheduler_steps_when_the_epoch_had_an_update():
    # 7 micro-steps per epoch, windows of 4: epochs end mid-window, but each
    # epoch applies at least one update, so an epoch-level scheduler steps.
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), merge_grad=4)
    sched = S.StepLR(opt, step_size=1, gamma=0.5)
    for epoch in range(3):
        _run_micro_steps(model, opt, 7, start=7 * epoch)
        sched.step()
        assert sched.last_epoch == epoch + 1
    assert _lr(opt) == [0.125]


def test_skipped_window_holds_schedulers():
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), merge_grad=2)
    sched = S.ExponentialLR(opt, gamma=0.5)
    _run_micro_steps(model, opt, 4, sched, bad_at=(2,))
    assert opt.skipped_updates == 1 and opt.iterations == 1
    assert sched.last_epoch == 1 and _lr(opt) == [0.5]
    opt.flush()  # empty window: no-op, no update, the scheduler still holds
    sched.step()
    assert sched.last_epoch == 1


def test_scheduler_on_the_inner_optimizer_is_gated_too():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = AccumOptimizer(inner, merge_grad=3)
    sched = S.ExponentialLR(inner, gamma=0.5)
    _run_micro_steps(model, opt, 6, sched)
    assert sched.last_epoch == 2 and _lr(inner) == [0.25]


def test_scheduler_subclass_defined_later_is_gated_once():
    class Halving(S.LRScheduler):
        def get_lr(self):
            return [
                g["lr"] * (0.5 if self.last_epoch > 0 else 1.0) for g in self.optimizer.param_groups
            ]

        def step(self, epoch=None):  # an override calling super(): gated once, not twice
            super().step(epoch)

    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), merge_grad=2)
    sched = Halving(opt)
    _run_micro_steps(model, opt, 6, sched)
    assert sched.last_epoch == 3 and _lr(opt) == [0.125]


def test_flush_counts_as_an_update_for_schedulers():
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), merge_grad=4)
    sched = S.ExponentialLR(opt, gamma=0.5)
    _run_micro_steps(model, opt, 2, sched)
    assert opt.flush() and opt.iterations == 1
    sched.step()
    assert _lr(opt) == [0.5]


# -- GradScaler ---------------------------------------------------------------------


def _scaled_run(n, *, scaler, merge_grad=4, bad_at=(), autocast=False, flush=False, **kwargs):
    model = _model()
    opt = AccumOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01), merge_grad=merge_grad, **kwargs
    )
    scales = []
    for i in range(n):
        x, y = _batch(i, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        if i in bad_at:
            loss = loss * math.inf
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        opt.zero_grad()
    if flush:
        opt.flush()
    return model, opt, scales


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_grad_scaler_run_equals_unscaled_run(autocast):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    model, opt, scales = _scaled_run(12, scaler=scaler, autocast=autocast)
    ref_model, ref_opt, _ = _scaled_run(12, scaler=None, autocast=autocast)
    assert opt.iterations == ref_opt.iterations == 3
    for a, e in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, e)
    # The scale moves only at updates (micro-steps 4, 8, 12), and its growth
    # counts updates: growth_interval=2 doubles it after the 2nd update only.
    assert scales == [2.0**8] * 7 + [2.0**9] * 5


def test_grad_scaler_overflow_skips_the_window_and_backs_off_once():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=100)
    model, opt, scales = _scaled_run(12, scaler=scaler, bad_at=(5,))
    # The reference skips the same window by its own non-finite policy.
    ref_model, ref_opt, _ = _scaled_run(12, scaler=None, bad_at=(5,))
    assert opt.skipped_updates == ref_opt.skipped_updates == 1
    assert opt.iterations == ref_opt.iterations == 2
    for a, e in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, e)
    assert scales == [2.0**8] * 7 + [2.0**7] * 5  # halved at the skipped update only


def test_grad_scaler_skips_overflow_even_with_ignore():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, opt, _ = _scaled_run(8, scaler=scaler, bad_at=(1,), on_nonfinite="ignore")
    assert opt.skipped_updates == 1 and opt.iterations == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scaler_flush_unscales_with_the_window_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, opt, _ = _scaled_run(6, scaler=scaler, flush=True)
    ref_model, ref_opt, _ = _scaled_run(6, scaler=None, flush=True)
    assert opt.iterations == ref_opt.iterations == 2
    for a, e in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, e)


def test_unscale_before_step_is_refused():
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=2)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _batch(0, 4)
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)
    assert opt.micro_steps == 0


def test_grad_scaler_with_scheduler_and_weights():
    # The scheduler wraps opt.step; GradScaler must still find `grad_scaler`
    # in its signature, and weighted side buffers must unscale the same way.
    def run(scaler):
        model = _model()
        opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), merge_grad=2)
        sched = S.ExponentialLR(opt, gamma=0.5)
        for i in range(6):
            x, y = _batch(i, 4)
            loss = torch.nn.functional.mse_loss(model(x), y)
            if scaler is None:
                loss.backward()
                opt.step(weight=float(i + 1))
            else:
                scaler.scale(loss).backward()
                scaler.step(opt, weight=float(i + 1))
                scaler.update()
            sched.step()
            opt.zero_grad()
        return model, opt

    model, opt = run(torch.amp.GradScaler("cpu", init_scale=2.0**6))
    ref_model, ref_opt = run(None)
    assert opt.iterations == 3 and _lr(opt) == _lr(ref_opt) == [0.0625]
    for a, e in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, e)
