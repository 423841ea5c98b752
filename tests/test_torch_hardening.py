"""keras_accum.torch.AccumOptimizer in the places demanding torch users poke at.

Each test pins one behaviour that used to be silently wrong: loading into the
inner optimizer, copying and pickling, catching an `on_nonfinite="raise"`
error, a GradScaler shared with a plain optimizer, `model.zero_grad()` inside
a window, state-dict hooks, an all-zero-weight window, the GradScaler warning
filter, recompiles with a GradScaler, and one inner optimizer in two wrappers.
Numbers are checked against a plain-optimizer run, a run that never saw the
bad batch, or the NumPy oracle (`tests/reference.py`), never against the code
under test.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as S

import keras_accum.torch  # noqa: F401 (first: keras_accum then loads without TensorFlow)
from keras_accum.torch import AccumOptimizer

try:  # tests/ on sys.path (pytest's default "prepend" import mode)
    import reference as ref
except ImportError:  # tests/ as a package
    from tests import reference as ref


def _model(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(
        dtype
    )


def _batch(i: int, n: int = 4, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(n, 4, generator=g).to(dtype), torch.randn(n, 2, generator=g).to(dtype)


def _loss(model, i: int, n: int = 4, dtype=torch.float32):
    x, y = _batch(i, n, dtype)
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def _assert_equal_params(a, b) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), (p, q)


def _snapshot(model, opt) -> dict:
    """Everything a micro-step may change: parameters, `.grad`, the state dict."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "opt": copy.deepcopy(opt.state_dict()),
    }


def _assert_same(a, b) -> None:
    """Recursive bit-equality of nested dicts/lists/tensors/numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b, (a, b)


# -- loading a plain optimizer's state into the inner one -----------------------------------


def test_inner_load_state_dict_keeps_groups_shared_and_the_scheduler_driving():
    """The advice of the refusal, followed: a scheduler on the wrapper still drives the inner LR."""
    plain_model = _model()
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.4, momentum=0.9)
    for i in range(2):  # a plain run with momentum state, saved
        _loss(plain_model, i, 8).backward()
        plain.step()
        plain.zero_grad()
    saved = copy.deepcopy(plain.state_dict())

    model = copy.deepcopy(plain_model)
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), merge_grad=2)
    with pytest.raises(ValueError, match=r"opt\.inner_optimizer\.load_state_dict") as err:
        opt.load_state_dict(saved)
    assert "nothing was loaded" in str(err.value)
    opt.inner_optimizer.load_state_dict(saved)
    assert opt.param_groups is opt.inner_optimizer.param_groups
    assert opt.param_groups[0]["lr"] == 0.4

    sched = S.StepLR(opt, step_size=1, gamma=0.5)
    plain_sched = S.StepLR(plain, step_size=1, gamma=0.5)
    for b in range(3):  # merge_grad=2 on batches of 4 == batches of 8
        for k in range(2):
            x, y = _batch(10 + b, 8)
            xs, ys = x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]
            torch.nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        _loss(plain_model, 10 + b, 8).backward()
        plain.step()
        plain_sched.step()
        plain.zero_grad()
    assert opt.inner_optimizer.param_groups[0]["lr"] == plain.param_groups[0]["lr"] == 0.05
    for p, q in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_assigning_param_groups_on_either_object_keeps_them_shared():
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=2)
    groups = [dict(g) for g in opt.param_groups]
    opt.param_groups = groups
    assert opt.inner_optimizer.param_groups is groups
    other = [dict(g) for g in groups]
    opt.inner_optimizer.param_groups = other
    assert opt.param_groups is other


# -- copy.deepcopy, pickle, torch.save -----------------------------------------------------


COPY_CONFIGS = {
    "grad_ema_clip": (
        torch.float32,
        dict(merge_grad=3, use_ema=True, ema_momentum=0.7, global_clipnorm=0.5),
        False,
    ),
    "weighted": (torch.float32, dict(merge_grad=3, clipvalue=0.3), True),
    "bf16_fp32_buffers": (torch.bfloat16, dict(merge_grad=3, accumulator_dtype="float32"), False),
}


def _copy_by(how: str, obj):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch_save"])
@pytest.mark.parametrize("name", list(COPY_CONFIGS))
def test_copied_optimizer_runs_in_lockstep(name, how):
    dtype, kwargs, weighted = COPY_CONFIGS[name]

    def micro_step(model, opt, sched, k):
        _loss(model, k, dtype=dtype).backward()
        opt.step(weight=float(1 + k % 2) if weighted else None)
        sched.step()
        opt.zero_grad()

    model = _model(dtype=dtype)
    opt = AccumOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), **kwargs)
    sched = S.ExponentialLR(opt, gamma=0.8)
    for k in range(4):  # mid-window: one update, one micro-step into the next window
        micro_step(model, opt, sched, k)
    assert opt.window_steps == 1

    model2, opt2, sched2 = _copy_by(how, (model, opt, sched))
    assert opt2.inner_optimizer is not opt.inner_optimizer
    assert opt2.param_groups is opt2.inner_optimizer.param_groups
    assert [p for g in opt2.param_groups for p in g["params"]] == list(model2.parameters())
    assert (opt2.iterations, opt2.micro_steps, opt2.window_steps) == (1, 4, 1)
    _assert_same(opt2.state_dict(), opt.state_dict())
    for k in range(4, 11):
        micro_step(model, opt, sched, k)
        micro_step(model2, opt2, sched2, k)
        _assert_equal_params(model2, model)
        _assert_same(opt2.state_dict(), opt.state_dict())
    assert opt2.iterations == opt.iterations == 3
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.8**3)


def test_deepcopy_of_the_optimizer_alone_steps_its_own_copies():
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=2)
    _loss(model, 0).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt2 = copy.deepcopy(opt)
    copies = [p for g in opt2.param_groups for p in g["params"]]
    assert all(c is not p for c, p in zip(copies, model.parameters()))
    (sum(c.sum() for c in copies)).backward()
    opt2.step()  # closes the copy's window; the original's stays open
    assert opt2.iterations == 1 and opt.iterations == 0 and opt.window_steps == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert not all(torch.equal(c, b) for c, b in zip(copies, before))
    with pytest.raises(TypeError, match="deepcopy"):
        copy.copy(opt)  # would share the inner optimizer


# -- on_nonfinite="raise": catch the error, skip the batch, go on ---------------------------


RAISE_CONFIGS = {
    "grad": (torch.float32, dict(), False),
    "weighted": (torch.float32, dict(), True),
    "bf16_fp32_buffers": (torch.bfloat16, dict(accumulator_dtype=torch.float32), False),
}


@pytest.mark.parametrize("name", list(RAISE_CONFIGS))
def test_catch_and_skip_equals_a_run_that_never_saw_the_bad_batch(name):
    dtype, kwargs, weighted = RAISE_CONFIGS[name]
    bad = {2, 7}  # window positions 3 of 4 and 4 of 4 (the update micro-step)

    def run(see_bad: bool):
        model = _model(dtype=dtype)
        opt = AccumOptimizer(
            torch.optim.Adam(model.parameters(), lr=0.01),
            merge_grad=4,
            on_nonfinite="raise",
            use_ema=True,
            **kwargs,
        )
        raised = 0
        for k in range(14):
            if k in bad and not see_bad:
                continue
            loss = _loss(model, k, dtype=dtype)
            if k in bad:
                loss = loss * math.inf
            loss.backward()
            before = _snapshot(model, opt)
            try:
                opt.step(weight=float(1 + k % 3) if weighted else None)
            except FloatingPointError as err:
                raised += 1
                assert "nothing was accumulated" in str(err)
                opt.zero_grad()  # the batch is skipped: its gradient goes
                after = _snapshot(model, opt)
                _assert_same(after["params"], before["params"])
                _assert_same(after["opt"], before["opt"])
                continue
            opt.zero_grad()
        return model, opt, raised

    model, opt, raised = run(see_bad=True)
    ref_model, ref_opt, ref_raised = run(see_bad=False)
    assert (raised, ref_raised) == (2, 0)
    assert opt.iterations == ref_opt.iterations == 3
    assert opt.micro_steps == ref_opt.micro_steps == 12
    _assert_equal_params(model, ref_model)
    _assert_same(opt.state_dict()["inner"], ref_opt.state_dict()["inner"])


def test_after_a_caught_raise_the_window_is_as_before_the_bad_micro_batch():
    model = _model()
    opt = AccumOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=3, on_nonfinite="raise"
    )
    _loss(model, 0).backward()
    opt.step()
    opt.zero_grad()
    window = copy.deepcopy(opt.state_dict()["state"])
    (_loss(model, 1) * math.nan).backward()
    with pytest.raises(FloatingPointError, match="micro-step 2 "):
        opt.step()
    assert opt.window_steps == 1 and opt.micro_steps == 1
    _assert_same(opt.state_dict()["state"], window)
    # Without zero_grad() the same gradient is still there: it raises again.
    with pytest.raises(FloatingPointError, match="micro-step 2 "):
        opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    _assert_same(opt.state_dict()["state"], window)


# -- a GradScaler shared with a plain optimizer ---------------------------------------------


@pytest.mark.filterwarnings("error:GradScaler is going to stop:FutureWarning")  # never shown
@pytest.mark.parametrize("plain_bad_at", [(), (5,)], ids=["growth", "plain_overflow"])
def test_shared_grad_scaler_moving_the_scale_inside_a_window(plain_bad_at):
    """torch's recipe for several optimizers: one scaler, both optimizers stepped through it.

    `growth_interval=1` doubles the scale after every clean micro-step of the
    plain optimizer, and its forced overflow halves it: the scale moves inside
    our windows, which are rescaled (powers of two: exactly) instead of
    discarded.
    """
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    model, other = _model(0), _model(1)
    opt = AccumOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), merge_grad=4)
    plain = torch.optim.SGD(other.parameters(), lr=0.1)
    scales = []
    for k in range(12):
        other_loss = _loss(other, 100 + k)
        if k in plain_bad_at:
            other_loss = other_loss * math.inf
        scaler.scale(_loss(model, k) + other_loss).backward()
        scaler.step(opt)
        scaler.step(plain)
        scaler.update()
        scales.append(scaler.get_scale())
        opt.zero_grad()
        plain.zero_grad()
    assert len(set(scales)) > 3  # the scale really moved inside windows

    ref_model = _model(0)
    ref_opt = AccumOptimizer(torch.optim.Adam(ref_model.parameters(), lr=0.01), merge_grad=4)
    for k in range(12):
        _loss(ref_model, k).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert opt.skipped_updates == 0 and opt.iterations == ref_opt.iterations == 3
    _assert_equal_params(model, ref_model)


def test_manual_new_scale_inside_a_window_rescales_it():
    def run(scaler):
        model = _model()
        opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=3)
        for k in range(6):
            loss = _loss(model, k)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update(2.0 ** (4 + k) if k % 3 == 0 else None)  # mid-window, by hand
            opt.zero_grad()
        return model, opt

    model, opt = run(torch.amp.GradScaler("cpu", init_scale=2.0**8))
    ref_model, ref_opt = run(None)
    assert opt.iterations == ref_opt.iterations == 2 and opt.skipped_updates == 0
    _assert_equal_params(model, ref_model)


@pytest.mark.filterwarnings("error:GradScaler is going to stop:FutureWarning")  # never shown
def test_scale_changed_behind_the_scalers_back_skips_the_window_with_a_warning():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=2)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(_loss(model, 0)).backward()
    scaler.step(opt)
    scaler.update()
    scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**4})  # not through update()
    scaler.scale(_loss(model, 1)).backward()
    with pytest.warns(RuntimeWarning, match="scale"):
        scaler.step(opt)
    scaler.update()
    assert opt.skipped_updates == 1 and opt.iterations == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


# -- model.zero_grad() inside a window ------------------------------------------------------


def test_model_zero_grad_inside_a_window_raises_and_changes_nothing():
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=3)
    _loss(model, 0).backward()
    opt.step()
    model.zero_grad()  # the mistake: drops micro-batch 0 from `.grad`
    _loss(model, 1).backward()
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=r"model\.zero_grad\(\)"):
        opt.step()
    assert opt.micro_steps == 1 and opt.window_steps == 1
    _assert_same(opt.state_dict(), state)


@pytest.mark.parametrize("mistake_at", [1, 2])
def test_model_zero_grad_before_backward_is_caught_at_every_window_position(mistake_at):
    # The habit `model.zero_grad(); loss.backward(); opt.step()` with merge_grad=3.
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=3)
    for k in range(mistake_at):
        _loss(model, k).backward()
        opt.step()
    model.zero_grad()
    _loss(model, mistake_at).backward()
    with pytest.raises(RuntimeError, match="earlier micro-steps"):
        opt.step()


def test_grad_identity_check_allows_the_legitimate_loops():
    # opt.zero_grad() every micro-step, a parameter without gradient in a
    # micro-step, a flush, side buffers (where `.grad` is replaced on purpose).
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=3)
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for k in range(7):
        if k % 3 == 1:
            model[2](model[1](model[0](_batch(k)[0]))).sum().mul(0).backward()
            model[2].weight.grad = model[2].weight.grad  # same object: allowed
        else:
            _loss(model, k).backward()
        opt.step()
        opt.zero_grad()
    opt.flush()
    assert opt.iterations == 3
    weighted = AccumOptimizer(torch.optim.SGD(ref_model.parameters(), lr=0.1), merge_grad=3)
    for k in range(4):
        _loss(ref_model, k).backward()
        weighted.step(weight=1.0)
        ref_model.zero_grad()  # harmless with side buffers: `.grad` was moved out
    assert weighted.iterations == 1
    del ref_opt


def _ddp_bucket_view_worker(rank: int, port: int, out_path: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # gradient_as_bucket_view: the first all-reduce after no_sync micro-steps
        # swaps `.grad` for a view of DDP's bucket; that is not a zero_grad().
        ddp = torch.nn.parallel.DistributedDataParallel(_model(), gradient_as_bucket_view=True)
        opt = AccumOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), merge_grad=3)
        for k in range(6):
            x, y = _batch(2 * k + rank)
            with opt.no_sync(ddp):
                torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
        if rank == 0:
            torch.save({"params": [p.detach() for p in ddp.module.parameters()]}, out_path)
        dist.barrier()
    finally:
        # DDP's C++ reducer owns a reference to the process group and is freed
        # with the GIL held. Were it the group's last owner, the group's
        # destructor would join gloo's worker thread while that thread waits
        # for the GIL to free its last work item: this worker hung so, once,
        # at its return (pytorch/pytorch#56297). Free DDP (and its cycles)
        # while the group is registered; `destroy_process_group` then drops
        # the group through a binding that releases the GIL.
        ddp = opt = None
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_ddp_bucket_view_swap_is_not_taken_for_a_zero_grad(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_bucket_view_worker, args=(port, out_path), nprocs=2, join=True)
    got = torch.load(out_path, weights_only=True)["params"]
    model = _model()  # the single-process large batch: 3 micro-steps x 2 ranks
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    for u in range(2):
        xs, ys = zip(*(_batch(2 * k + r) for k in range(3 * u, 3 * u + 3) for r in range(2)))
        torch.nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        plain.step()
        plain.zero_grad()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.detach(), rtol=1e-5, atol=1e-6)


# -- state-dict hooks -----------------------------------------------------------------------


def test_load_state_dict_pre_hook_result_is_what_gets_loaded():
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=2)
    _loss(model, 0).backward()
    opt.step()
    saved = opt.state_dict()
    calls = []

    def pre_hook(optimizer, state_dict):
        calls.append(("pre", optimizer))
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [{**g, "lr": 0.025} for g in state_dict["param_groups"]]
        return state_dict

    def post_hook(optimizer):
        calls.append(("post", optimizer, optimizer.micro_steps))

    model2 = copy.deepcopy(model)
    opt2 = AccumOptimizer(torch.optim.SGD(model2.parameters(), lr=0.1), merge_grad=2)
    opt2.register_load_state_dict_pre_hook(pre_hook)
    opt2.register_load_state_dict_post_hook(post_hook)
    opt2.load_state_dict(saved)
    assert calls == [("pre", opt2), ("post", opt2, 1)]  # once each; post after our counters
    assert opt2.param_groups is opt2.inner_optimizer.param_groups
    assert opt2.inner_optimizer.param_groups[0]["lr"] == 0.025
    assert saved["param_groups"][0]["lr"] == 0.1  # the caller's dict is not modified


def test_state_dict_post_hook_sees_and_may_replace_the_whole_dict():
    model = _model()
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=2)
    seen = []

    def post_hook(optimizer, state_dict):
        seen.append(sorted(state_dict))
        return {**state_dict, "extra": 1}

    opt.register_state_dict_post_hook(post_hook)
    sd = opt.state_dict()
    assert seen == [["accum", "inner", "param_groups", "state"]]
    assert sd["extra"] == 1 and "accum" in sd


# -- a window whose weights are all zero ----------------------------------------------------


def _zero_weight_stream():
    g = np.random.default_rng(3)
    grads = [
        [g.standard_normal((2, 3)).astype(np.float32), g.standard_normal(3).astype(np.float32)]
        for _ in range(10)
    ]
    # Window 2 weighs 0; window 3 has one zero weight; the partial 4th weighs 0.
    weights = [1.0, 2.0, 0.5, 0.0, 0.0, 0.0, 3.0, 1.0, 0.0, 0.0]
    return list(zip(grads, weights))


@pytest.mark.parametrize("on_nonfinite", ["skip", "ignore"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_zero_weight_window_applies_nothing_and_counts_no_update(reduction, on_nonfinite):
    stream = _zero_weight_stream()
    init = [np.full((2, 3), 0.5, np.float32), np.zeros(3, np.float32)]
    kwargs = dict(merge_grad=3, reduction=reduction, on_nonfinite=on_nonfinite, use_ema=True)
    oracle = ref.RefAccum(init, ref.RefSGD(0.1, momentum=0.9), **kwargs)
    params = [torch.nn.Parameter(torch.tensor(p)) for p in init]
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9), **kwargs)
    sched = S.StepLR(opt, step_size=1, gamma=0.5)
    for k, (grads, w) in enumerate(stream):
        oracle.inner.lr = 0.1 * 0.5**oracle.iterations  # StepLR(gamma=0.5) per update
        oracle.step(grads, w)
        for p, g in zip(params, grads):
            (p * torch.tensor(g)).sum().backward()
        opt.step(weight=w)
        sched.step()
        opt.zero_grad()
        if k == 5:  # the zero-weight window closed: nothing moved
            assert opt.iterations == oracle.iterations == 1
            assert opt.skipped_updates == oracle.skipped_updates == 0
            assert opt.param_groups[0]["lr"] == 0.05
    oracle.inner.lr = 0.1 * 0.5**oracle.iterations
    oracle.flush()
    assert opt.flush() is True  # a partial window of weight 0: applied as nothing
    assert opt.iterations == oracle.iterations == 2
    assert opt.skipped_updates == 0 and opt.window_steps == 0
    assert opt.param_groups[0]["lr"] == 0.025
    for p, e in zip(params, oracle.params):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=2e-6, atol=1e-6)
    for p, e in zip(params, oracle.ema):
        np.testing.assert_allclose(opt.state[p]["ema"].numpy(), e, rtol=2e-6, atol=1e-6)
    assert all(torch.isfinite(p).all() for p in params)


# -- the GradScaler warning filter; recompiles with a GradScaler ----------------------------


_WARNING_SCOPE_CHECK = """
import warnings
warnings.simplefilter("error", FutureWarning)  # as `python -W error::FutureWarning`
import torch
import keras_accum.torch
from keras_accum.torch import AccumOptimizer

assert not any("GradScaler" in str(f[1]) for f in warnings.filters), warnings.filters


class ScalerAware(torch.optim.SGD):
    # A plain optimizer of the old GradScaler protocol: torch's warning is its user's business.
    _step_supports_amp_scaling = True

    def step(self, closure=None, grad_scaler=None):
        return super().step(closure)


p = torch.nn.Parameter(torch.zeros(2))
scaler = torch.amp.GradScaler("cpu")
ours = AccumOptimizer(torch.optim.SGD([p], lr=0.1), merge_grad=2)
for _ in range(2):  # ours: no warning, so no error
    scaler.scale(p.sum()).backward()
    scaler.step(ours)
    scaler.update()
    ours.zero_grad()
assert ours.iterations == 1
other = ScalerAware([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
try:
    scaler.step(other)
except FutureWarning as err:
    assert "GradScaler is going to stop" in str(err)
else:
    raise AssertionError("the plain optimizer's FutureWarning was hidden")
print("ok")
"""


def test_grad_scaler_warning_is_hidden_only_for_our_optimizers():
    out = subprocess.run(
        [sys.executable, "-c", _WARNING_SCOPE_CHECK],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.filterwarnings("error:GradScaler is going to stop:FutureWarning")  # never shown
def test_compiled_step_with_grad_scaler_never_recompiles():
    from torch._dynamo.utils import counters

    def train(compiled: bool):
        model = _model()
        opt = AccumOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), merge_grad=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
        scaler.scale(torch.ones(())).detach()  # the scale exists before the first trace

        def train_step(x, y):
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            return loss.detach()

        step = torch.compile(train_step, backend="eager", dynamic=False) if compiled else train_step
        losses = [step(*_batch(k)) for k in range(9)]
        return model, opt, losses, scaler.get_scale()

    torch._dynamo.reset()
    counters.clear()
    try:
        torch._dynamo.config.error_on_recompile = True
        model, opt, losses, scale = train(compiled=True)
        recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
        frames = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    ref_model, ref_opt, ref_losses, ref_scale = train(compiled=False)
    assert recompiles == 0 and frames >= 1
    assert opt.iterations == ref_opt.iterations == 3 and scale == ref_scale == 2.0**11
    for a, b in zip(losses, ref_losses):
        assert torch.equal(a, b)
    _assert_equal_params(model, ref_model)


# -- one inner optimizer, two wrappers ------------------------------------------------------


def test_an_inner_optimizer_wrapped_twice_is_refused():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    first = AccumOptimizer(inner, merge_grad=2)
    with pytest.raises(ValueError, match="already wrapped") as err:
        AccumOptimizer(inner, merge_grad=3)
    assert "Received: optimizer=" in str(err.value)
    # The first wrapper still owns it: its scheduler gate still counts its updates.
    sched = S.StepLR(inner, step_size=1, gamma=0.5)
    for k in range(4):
        _loss(model, k).backward()
        first.step()
        sched.step()
        first.zero_grad()
    assert first.iterations == 2 and inner.param_groups[0]["lr"] == 0.025
    del first, sched
    gc.collect()
    second = AccumOptimizer(inner, merge_grad=3)  # its owner is gone: allowed
    assert second.inner_optimizer is inner
