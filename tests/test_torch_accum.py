"""keras_accum.torch.AccumOptimizer against the NumPy oracle and plain torch.

The spine (style.md): k micro-steps through the wrapper equal one inner step
on the merged gradient, checked by replaying the oracle's handed-on gradients
(`RefAccum` + `RecordingInner`) through a fresh, plain torch optimizer, over a
table of optimizers with foreach on and off. Then every `CASES` and
`NONFINITE_CASES` row against `RefAccum` with torch's SGD (`RefSGD` is torch's
form), a large-batch equivalence on a tiny MLP, and bit-identity with the
inner optimizer for `merge_grad=1`.
"""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode

import keras_accum.torch  # noqa: F401 (first: keras_accum then loads without TensorFlow)
from keras_accum import _core
from keras_accum.torch import AccumOptimizer

try:  # tests/ on sys.path (pytest's default "prepend" import mode)
    import cases
    import reference as ref
except ImportError:  # tests/ as a package
    from tests import cases
    from tests import reference as ref

# -- the optimizer table: adding an optimizer is one line ------------------------

OPTIMIZERS = {
    "sgd": lambda ps, fe: torch.optim.SGD(ps, lr=0.1, foreach=fe),
    "sgd_momentum": lambda ps, fe: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=fe),
    "sgd_nesterov": lambda ps, fe: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=fe
    ),
    "adam": lambda ps, fe: torch.optim.Adam(ps, lr=0.01, foreach=fe),
    "adamw": lambda ps, fe: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=fe),
    "rmsprop": lambda ps, fe: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, foreach=fe),
    "adagrad": lambda ps, fe: torch.optim.Adagrad(ps, lr=0.1, foreach=fe),
    "nadam": lambda ps, fe: torch.optim.NAdam(ps, lr=0.01, foreach=fe),
    "radam": lambda ps, fe: torch.optim.RAdam(ps, lr=0.01, foreach=fe),
    "adamax": lambda ps, fe: torch.optim.Adamax(ps, lr=0.01, foreach=fe),
    # Fused kernels exclude foreach: one row ("fused") instead of two.
    "adamw_fused": lambda ps, fe: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True),
}
OPT_TABLE = [
    pytest.param(name, fe, id=f"{name}-{'foreach' if fe else 'loop'}")
    for name in OPTIMIZERS
    if not name.endswith("_fused")
    for fe in (False, True)
] + [pytest.param(name, None, id=name) for name in OPTIMIZERS if name.endswith("_fused")]
CASE_BY_ID = {c.id: c for c in cases.CASES}


def _torch_params(np_params, dtype=torch.float32) -> list:
    return [torch.nn.Parameter(torch.tensor(p, dtype=dtype)) for p in np_params]


def _backward(params, grads) -> None:
    """One backward whose gradient is exactly `grads` (None: no gradient).

    d/dp sum(p * g) = g bit-exactly, and autograd adds it into an existing
    `.grad` in place, as in any training loop.
    """
    terms = [
        (p * torch.tensor(g, dtype=p.dtype)).sum() for p, g in zip(params, grads) if g is not None
    ]
    if terms:
        torch.stack(terms).sum().backward()


def _run(opt, params, stream, weighted, flush=False) -> None:
    for grads, weight in stream:
        _backward(params, grads)
        opt.step(weight=weight if weighted else None)
        opt.zero_grad()
    if flush:
        opt.flush()
        opt.zero_grad()


def _assert_params(actual, expected, rtol=2e-6, atol=1e-6) -> None:
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(
            a.detach().float().numpy(), np.asarray(e, np.float32), rtol=rtol, atol=atol
        )


# -- the spine --------------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["merge4", "merge4_weighted", "merge4_none_whole_window"])
@pytest.mark.parametrize("name,foreach", OPT_TABLE)
def test_spine_equals_inner_on_merged_gradients(name, foreach, case_id):
    """k micro-steps through the wrapper == the inner optimizer on the oracle's merged grads."""
    case = CASE_BY_ID[case_id]
    np_params = cases.make_params(seed=1)
    stream = cases.make_stream(case, seed=1)
    recorder = ref.RecordingInner()
    oracle = ref.RefAccum(np_params, recorder, **case.kwargs)
    for grads, weight in stream:
        oracle.step(grads, weight)

    # Replay: a plain torch optimizer stepped on the handed-on gradients.
    plain_params = _torch_params(np_params)
    plain = OPTIMIZERS[name](plain_params, foreach)
    for handed in recorder.calls:
        for p, g in zip(plain_params, handed):
            p.grad = None if g is None else torch.tensor(g)
        plain.step()

    params = _torch_params(np_params)
    opt = AccumOptimizer(OPTIMIZERS[name](params, foreach), **case.kwargs)
    _run(opt, params, stream, weighted=case.weights is not None)

    assert opt.iterations == len(recorder.calls) == case.n_updates
    assert opt.micro_steps == case.n_micro
    for a, e in zip(params, plain_params):
        # The wrapper sums and divides in the oracle's order (autograd adds
        # each micro-step into .grad; one division by the weight sum), so the
        # inner optimizer gets the same bits and takes the same steps.
        assert torch.equal(a, e)
    if case_id == "merge4_none_whole_window":
        # Variable 2 got no gradient in window 2: the inner optimizer must not
        # have touched its state then (plain replay handed it grad=None too).
        s_acc = opt.inner_optimizer.state.get(params[2], {})
        s_plain = plain.state.get(plain_params[2], {})
        assert s_acc.keys() == s_plain.keys()
        for k in s_acc:
            assert torch.equal(s_acc[k], s_plain[k])


# -- every case row against the oracle ----------------------------------------------


def _oracle_and_wrapper(case, momentum, seed=2):
    np_params = cases.make_params(seed=seed)
    stream = cases.make_stream(case, seed=seed)
    oracle = ref.RefAccum(np_params, ref.RefSGD(0.1, momentum=momentum), **case.kwargs)
    for grads, weight in stream:
        oracle.step(grads, weight)
    if case.flush_at_end:
        oracle.flush()
    params = _torch_params(np_params)
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1, momentum=momentum), **case.kwargs)
    _run(opt, params, stream, weighted=case.weights is not None, flush=case.flush_at_end)
    return oracle, opt, params


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
@pytest.mark.parametrize("case", cases.CASES, ids=[c.id for c in cases.CASES])
def test_case_matches_oracle(case, momentum):
    oracle, opt, params = _oracle_and_wrapper(case, momentum)
    _assert_params(params, oracle.params)
    assert opt.iterations == oracle.iterations == case.n_updates
    assert opt.micro_steps == oracle.micro_steps
    assert opt.skipped_updates == oracle.skipped_updates == 0
    assert opt.window_steps == oracle.window_steps
    assert opt.window_weight == pytest.approx(float(oracle.window_weight))
    np.testing.assert_allclose(float(opt.last_grad_norm), float(oracle.last_grad_norm), rtol=2e-6)
    if opt.use_ema:
        _assert_params([opt.state[p]["ema"] for p in params], oracle.ema)


@pytest.mark.parametrize("case", cases.NONFINITE_CASES, ids=[c.id for c in cases.NONFINITE_CASES])
def test_nonfinite_case_matches_oracle(case):
    np_params = cases.make_params(seed=0)
    stream = case.stream(seed=0)
    oracle = ref.RefAccum(np_params, ref.RefSGD(0.1, momentum=0.9), **case.kwargs)
    params = _torch_params(np_params)
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9), **case.kwargs)
    for k, (grads, weight) in enumerate(stream):
        if case.on_nonfinite == "raise" and k == case.position:
            with pytest.raises(FloatingPointError) as oracle_error:
                oracle.step(grads, weight)
            before = [p.detach().clone() for p in params]
            _backward(params, grads)
            with pytest.raises(FloatingPointError, match=f"micro-step {k + 1} ") as error:
                opt.step()
            assert f"micro-step {k + 1} " in str(oracle_error.value)
            assert "nothing was accumulated" in str(error.value)
            # Nothing changed: counters, window, parameters, inner state.
            assert (opt.micro_steps, opt.window_steps, opt.iterations) == (k, k, 0)
            assert opt.window_weight == k
            assert not opt.inner_optimizer.state
            for p, b in zip(params, before):
                assert torch.equal(p, b)
            return
        oracle.step(grads, weight)
        _backward(params, grads)
        opt.step()
        opt.zero_grad()
    assert case.on_nonfinite != "raise"
    assert opt.iterations == oracle.iterations
    assert opt.skipped_updates == oracle.skipped_updates
    assert opt.skipped_updates == (1 if case.on_nonfinite == "skip" else 0)
    for a, e in zip(params, oracle.params):
        np.testing.assert_allclose(a.detach().numpy(), e, rtol=2e-6, atol=1e-6, equal_nan=True)
    if case.on_nonfinite == "skip":
        assert all(torch.isfinite(p).all() for p in params)


def test_skip_discards_window_and_leaves_everything():
    params = _torch_params(cases.make_params(seed=5))
    opt = AccumOptimizer(
        torch.optim.Adam(params, lr=0.1), merge_grad=2, use_ema=True, ema_momentum=0.5
    )
    for _ in range(2):
        _backward(params, [np.ones(p.shape, np.float32) for p in params])
        opt.step()
        opt.zero_grad()
    snapshot = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    bad = [np.full(p.shape, np.nan, np.float32) for p in params]
    _backward(params, bad)
    opt.step()
    _backward(params, [np.ones(p.shape, np.float32) for p in params])
    opt.step()
    assert opt.skipped_updates == 1 and opt.iterations == 1
    assert not math.isfinite(float(opt.last_grad_norm))
    assert all(p.grad is None for p in params)  # the window is reset, not subtracted
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    after = opt.state_dict()
    for i, s in snapshot["inner"]["state"].items():
        for k, v in s.items():
            assert torch.equal(after["inner"]["state"][i][k], v)
    for i, s in snapshot["state"].items():
        assert torch.equal(after["state"][i]["ema"], s["ema"])
    # The next window starts clean.
    for _ in range(2):
        _backward(params, [np.ones(p.shape, np.float32) for p in params])
        opt.step()
    assert opt.iterations == 2 and all(torch.isfinite(p).all() for p in params)


def test_raise_checks_weighted_product():
    # A finite gradient whose weighted product overflows float32 raises too.
    params = _torch_params([np.ones(2, np.float32)])
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1), merge_grad=2, on_nonfinite="raise")
    _backward(params, [np.full(2, 1e30, np.float32)])
    with pytest.raises(FloatingPointError, match="micro-step 1 "):
        opt.step(weight=1e10)
    assert opt.micro_steps == 0 and opt.window_steps == 0
    assert "accumulator" not in opt.state.get(params[0], {})


def test_nonfinite_check_is_exact_when_the_norm_overflows():
    # Finite elements whose squares overflow float32: not a non-finite window.
    params = _torch_params([np.zeros(4, np.float32)])
    opt = AccumOptimizer(torch.optim.SGD(params, lr=1e-30), merge_grad=2)
    for _ in range(2):
        _backward(params, [np.full(4, 1e20, np.float32)])
        opt.step()
    assert opt.skipped_updates == 0 and opt.iterations == 1
    torch.testing.assert_close(params[0].detach(), torch.full((4,), -1e-10))


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
def test_clip_when_only_the_window_sums_norm_overflows(clip):
    # Norm clipping takes the divide into its multiply, with the norms taken
    # on the sum: here the sum's squares overflow float32 (2e19 ** 2) while
    # the mean's do not (5e18 ** 2 * 4 = 1e38). The mean is still clipped as
    # the contract says, not zeroed by an infinite norm.
    stream = [([np.full(4, 5e18, np.float32)], 1.0)] * 4
    oracle = ref.RefAccum([np.zeros(4, np.float32)], ref.RefSGD(0.1), merge_grad=4, **{clip: 1.0})
    for grads, weight in stream:
        oracle.step(grads, weight)
    params = _torch_params([np.zeros(4, np.float32)])
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1), merge_grad=4, **{clip: 1.0})
    _run(opt, params, stream, weighted=False)
    assert opt.iterations == 1 and opt.skipped_updates == 0
    _assert_params(params, oracle.params)
    np.testing.assert_allclose(float(opt.last_grad_norm), float(oracle.last_grad_norm), rtol=2e-6)
    assert np.all(oracle.params[0] != 0)  # the oracle did move: a real check


# Integer gradients and weights whose products and sums are exact in the
# parameter's dtype: the merged gradient is then `sum / W` rounded once, which
# float64 computes exactly. Window weights: 3 (a third in bf16), 2**-16 (a
# reciprocal of 2**16 overflows float16), 4000 (1/4000 rounded in float16).
_EXACT_WINDOWS = {
    "bf16_W3": (torch.bfloat16, [1.0, 2.0, 4.0], None),
    "fp16_W2**-16": (torch.float16, [100.0] * 4, [2.0**-18] * 4),
    "fp16_W4000": (torch.float16, [1.0, 2.0, 3.0, 1.0], [1000.0] * 4),
    "bf16_W8": (torch.bfloat16, [1.0, 3.0, 5.0, 7.0, 2.0, 4.0, 6.0, 1.0], None),
}


@pytest.mark.parametrize("clip", [{}, {"clipnorm": 1e6}, {"global_clipnorm": 1e6}])
@pytest.mark.parametrize("window", list(_EXACT_WINDOWS), ids=list(_EXACT_WINDOWS))
def test_half_precision_window_is_its_sum_divided_once(window, clip):
    # The merged gradient is `sum / W` rounded once to the parameter's dtype,
    # with a norm clip that never acts too (it must not round 1 / W first).
    dtype, grads, weights = _EXACT_WINDOWS[window]
    weights = weights or [1.0] * len(grads)
    p = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
    opt = AccumOptimizer(torch.optim.SGD([p], lr=1.0), merge_grad=len(grads), **clip)
    for g, w in zip(grads, weights):
        _backward([p], [np.full(5, g, np.float32)])
        opt.step(weight=w if weights != [1.0] * len(grads) else None)
        opt.zero_grad()
    exact = sum(g * w for g, w in zip(grads, weights)) / sum(weights)
    assert (opt.iterations, opt.skipped_updates) == (1, 0)
    assert torch.equal(p.detach(), torch.full((5,), -exact, dtype=torch.float64).to(dtype))


class _HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (`.item()`, `bool()`, `.tolist()`)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        # `.tolist()` reads the values without a dispatched op.
        tolist = torch.Tensor.tolist

        def counted(tensor):
            self.count += 1
            return tolist(tensor)

        self._patch = pytest.MonkeyPatch()
        self._patch.setattr(torch.Tensor, "tolist", counted)
        return super().__enter__()

    def __exit__(self, *exc):
        self._patch.undo()  # removes the attribute again (torch.Tensor inherits it)
        return super().__exit__(*exc)


@pytest.mark.parametrize(
    "kwargs,reads",
    [
        ({}, 1),
        ({"clipnorm": 1.0}, 1),
        ({"global_clipnorm": 1.0, "merge_grad": 4}, 1),
        ({"on_nonfinite": "ignore"}, 0),
        # A norm clip needs the true norm: one read decides the rare
        # fallback for finite gradients whose squares overflow.
        ({"on_nonfinite": "ignore", "clipnorm": 1.0}, 1),
    ],
)
def test_host_reads_per_micro_step(kwargs, reads):
    # One host read per update for the skip check or a norm clip, none
    # where both are off; a micro-step that does not update reads nothing.
    kwargs = {"merge_grad": 3, **kwargs}
    params = _torch_params([np.zeros(8, np.float32)])
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1), **kwargs)
    counts = []
    for _ in range(kwargs["merge_grad"]):
        _backward(params, [np.arange(8, dtype=np.float32)])
        with _HostReads() as mode:
            opt.step()
        counts.append(mode.count)
        opt.zero_grad()
    assert opt.iterations == 1
    assert counts == [0] * (kwargs["merge_grad"] - 1) + [reads]


@pytest.mark.parametrize(
    "kwargs,create_graph",
    [
        ({}, True),
        ({"on_nonfinite": "raise"}, True),
        ({"global_clipnorm": 0.1}, True),
        ({"ema_overwrite_frequency": 1}, False),
        ({"global_clipnorm": 0.1, "ema_overwrite_frequency": 1}, False),
    ],
)
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_step_records_no_autograd_graph(kwargs, create_graph):
    # step() runs with grad mode on (it enters no_grad only for its tensor
    # work). Gradients that carry a graph (`backward(create_graph=True)`, side
    # buffers then) and the `.grad` path with the EMA written back into the
    # parameters (an in-place op on a leaf that requires grad raises under
    # grad mode): nothing the optimizer keeps or writes may join a graph.
    p = torch.nn.Parameter(torch.arange(4.0))
    opt = AccumOptimizer(torch.optim.SGD([p], lr=0.1), merge_grad=2, use_ema=True, **kwargs)
    for _ in range(4):
        (p * p).sum().backward(create_graph=create_graph)
        assert p.grad.requires_grad == create_graph
        opt.step(weight=1.0 if create_graph else None)
        kept = [t for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        assert not any(t.requires_grad for t in kept)
        opt.zero_grad()
    assert opt.iterations == 2 and p.is_leaf
    assert not opt.last_grad_norm.requires_grad
    assert not opt.state[p]["ema"].requires_grad
    p.grad = None  # breaks the parameter <-> gradient cycle of create_graph


# -- large batch, merge_grad=1 --------------------------------------------------------


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        dtype
    )


def _data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


@pytest.mark.parametrize("name,foreach", [p for p in OPT_TABLE if "foreach" not in p.id])
def test_large_batch_equivalence(name, foreach):
    """merge_grad=4 on micro-batches of 8 == batches of 32 (mean loss), to round-off."""
    x, y = _data(96)
    big = _mlp()
    small = copy.deepcopy(big)
    big_opt = OPTIMIZERS[name](big.parameters(), foreach)
    opt = AccumOptimizer(OPTIMIZERS[name](small.parameters(), foreach), merge_grad=4)
    for b in range(3):
        xb, yb = x[32 * b : 32 * (b + 1)], y[32 * b : 32 * (b + 1)]
        torch.nn.functional.mse_loss(big(xb), yb).backward()
        big_opt.step()
        big_opt.zero_grad()
        for k in range(4):
            xs, ys = xb[8 * k : 8 * (k + 1)], yb[8 * k : 8 * (k + 1)]
            torch.nn.functional.mse_loss(small(xs), ys).backward()
            opt.step()
            opt.zero_grad()
    assert opt.iterations == 3
    for a, e in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,foreach", OPT_TABLE)
def test_merge1_is_bit_identical_to_inner(name, foreach):
    x, y = _data(24)
    plain_model = _mlp()
    model = copy.deepcopy(plain_model)
    plain = OPTIMIZERS[name](plain_model.parameters(), foreach)
    opt = AccumOptimizer(OPTIMIZERS[name](model.parameters(), foreach))
    for b in range(3):
        for m, o in ((plain_model, plain), (model, opt)):
            torch.nn.functional.mse_loss(m(x[8 * b : 8 * b + 8]), y[8 * b : 8 * b + 8]).backward()
            o.step()
            o.zero_grad()
        for a, e in zip(model.parameters(), plain_model.parameters()):
            assert torch.equal(a, e)


# -- accumulators: bf16 with float32 side buffers, weights, None grads --------------------


def test_bf16_params_with_float32_accumulators_do_not_stall():
    # 1 + 63 * 2**-9 = 1.123046875 exactly in float32; bfloat16 (spacing 2**-7
    # at 1) rounds every 1 + 2**-9 back to 1 and the sum stalls at 1.
    grads = [np.ones(1, np.float32)] + [np.full(1, 2.0**-9, np.float32)] * 63

    def merged(accumulator_dtype):
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
        opt = AccumOptimizer(
            torch.optim.SGD([p], lr=1.0),
            merge_grad=64,
            reduction="sum",
            accumulator_dtype=accumulator_dtype,
        )
        for g in grads:
            _backward([p], [g])
            opt.step()
            opt.zero_grad()
        assert p.dtype == torch.bfloat16
        return -float(p.detach())

    assert merged(torch.float32) == 1.125  # 1.123046875 rounded once, to bfloat16
    assert merged(None) == 1.0  # the documented cost of accumulating in bf16 .grad


def test_float32_side_buffer_holds_the_window_and_grad_is_cleared():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    opt = AccumOptimizer(torch.optim.SGD([p], lr=1.0), merge_grad=3, accumulator_dtype="float32")
    _backward([p], [np.ones(3, np.float32)])
    opt.step()
    assert p.grad is None
    acc = opt.state[p]["accumulator"]
    assert acc.dtype == torch.float32 and torch.equal(acc, torch.ones(3))


def test_accumulator_dtype_equal_to_param_dtype_stays_in_grad():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = AccumOptimizer(torch.optim.SGD([p], lr=1.0), merge_grad=3, accumulator_dtype="float32")
    for _ in range(2):
        _backward([p], [np.ones(3, np.float32)])
        opt.step()
        opt.zero_grad()
    assert not opt.state  # no side buffer: the window is in .grad
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_weight_first_passed_mid_window_raises_before_changing_anything():
    params = _torch_params([np.zeros(2, np.float32)])
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1), merge_grad=2)
    _backward(params, [np.ones(2, np.float32)])
    opt.step()
    _backward(params, [np.ones(2, np.float32)])
    with pytest.raises(RuntimeError, match="first passed at window position 2 of 2"):
        opt.step(weight=3.0)
    assert opt.micro_steps == 1 and opt.window_steps == 1
    assert torch.equal(params[0].grad, torch.full((2,), 2.0))


def test_none_grad_keeps_accumulated_value():
    case = CASE_BY_ID["merge4_none_in_closing_step"]
    np_params = cases.make_params(seed=2)
    oracle, opt, params = _oracle_and_wrapper(case, momentum=0.0)
    # Variable 1 had no gradient in the micro-step closing window 1, yet its
    # earlier micro-steps were handed on and applied.
    assert oracle.handed[0][1] is not None
    assert not np.allclose(params[1].detach().numpy(), np_params[1])
    _assert_params(params, oracle.params)


def test_flush_empty_window_is_a_no_op():
    params = _torch_params([np.ones(2, np.float32)])
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9), merge_grad=3)
    assert opt.flush() is False
    assert opt.iterations == 0 and not opt.inner_optimizer.state
    _backward(params, [np.ones(2, np.float32)])
    opt.step()
    assert opt.flush() is True and opt.iterations == 1 and opt.window_steps == 0
    # The true divisor: one micro-step of weight 1, so the gradient itself.
    torch.testing.assert_close(params[0].detach(), torch.full((2,), 0.9))
    assert opt.flush() is False and opt.iterations == 1


def test_zero_grad_keeps_the_open_window():
    params = _torch_params([np.zeros(2, np.float32)])
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1), merge_grad=2)
    _backward(params, [np.ones(2, np.float32)])
    opt.step()
    opt.zero_grad()
    assert torch.equal(params[0].grad, torch.ones(2))  # still accumulating
    assert opt.next_step_updates
    _backward(params, [np.ones(2, np.float32)])
    opt.step()
    assert not opt.next_step_updates
    opt.zero_grad()
    assert params[0].grad is None


# -- EMA -----------------------------------------------------------------------------


def test_swap_ema_weights_is_bit_exact_and_leaves_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[0].to(torch.bfloat16)  # a bf16 parameter next to float32 ones
    opt = AccumOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.3), merge_grad=2, use_ema=True, ema_momentum=0.5
    )
    x = torch.randn(8, 3)
    for _ in range(6):
        model[1](model[0](x.bfloat16()).float()).square().mean().backward()
        opt.step()
        opt.zero_grad()
    raw = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    emas = [opt.state[p]["ema"] for p in model.parameters()]
    assert all(e.dtype == torch.float32 for e in emas)
    with opt.swap_ema_weights():
        for p, e in zip(model.parameters(), emas):
            assert torch.equal(p, e.to(p.dtype))
        for b, b0 in zip(model.buffers(), buffers):
            assert torch.equal(b, b0)
        with pytest.raises(RuntimeError, match="swapped"):
            opt.step()
    for p, r in zip(model.parameters(), raw):
        assert torch.equal(p, r)
    # The check above could fail: the EMA differs from the raw weights.
    assert not all(torch.equal(p, opt.state[p]["ema"].to(p.dtype)) for p in model.parameters())
    opt.finalize_variable_values()
    for p, e in zip(model.parameters(), emas):
        assert torch.equal(p, e.to(p.dtype))


@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)]
)
def test_ema_of_mixed_precision_parameters_follows_each_parameter(dtypes):
    # Parameters of two dtypes: the EMA (float32 for bf16, else the
    # parameter's) takes each through its own group, a bf16 one upcast.
    a = torch.nn.Parameter(torch.zeros(3, dtype=dtypes[0]))
    b = torch.nn.Parameter(torch.zeros(2, dtype=dtypes[1]))
    opt = AccumOptimizer(torch.optim.SGD([a, b], lr=1.0), use_ema=True, ema_momentum=0.5)
    expected, trajectory = None, []
    for k in range(4):
        a.grad = torch.full((3,), 0.25 * (k + 1), dtype=a.dtype)
        b.grad = torch.full((2,), -0.5 * (k + 1), dtype=b.dtype)
        opt.step()
        opt.zero_grad()
        now = [a.detach().double().numpy().copy(), b.detach().double().numpy().copy()]
        trajectory.append(now)
        expected = now if expected is None else [0.5 * e + 0.5 * p for e, p in zip(expected, now)]
    want = [torch.promote_types(t.dtype, torch.float32) for t in (a, b)]
    assert [opt.state[p]["ema"].dtype for p in (a, b)] == want
    _assert_params([opt.state[p]["ema"] for p in (a, b)], expected)
    assert not np.allclose(expected[0], trajectory[-1][0])  # the EMA lags: a real check


def test_ema_api_needs_use_ema():
    opt = AccumOptimizer(torch.optim.SGD(_torch_params([np.ones(1, np.float32)]), lr=0.1))
    with pytest.raises(ValueError, match=re.escape("`swap_in_ema` needs `use_ema=True`")):
        with opt.swap_ema_weights():
            pass
    opt.finalize_variable_values()  # no-op without EMA


# -- torch.optim plumbing: hooks, param groups --------------------------------------------


def test_hooks_fire():
    params = _torch_params([np.zeros(2, np.float32)])
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1), merge_grad=2)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    opt.inner_optimizer.register_step_post_hook(lambda o, a, k: seen.append("inner"))
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    handle = register_optimizer_step_post_hook(
        lambda o, a, k: seen.append(f"global_{type(o).__name__}")
    )
    try:
        for _ in range(2):
            _backward(params, [np.ones(2, np.float32)])
            opt.step()
    finally:
        handle.remove()
    # Global hooks fire once per step() call, the one the caller made, not
    # again for the inner optimizer's step inside it (torch's
    # test_step_all_hooks: one step, each hook once); the inner optimizer's
    # own hooks fire at the update.
    assert seen == [
        "pre", "post", "global_AccumOptimizer",
        "pre", "inner", "post", "global_AccumOptimizer",
    ]  # fmt: skip
    seen.clear()
    opt.load_state_dict(opt.state_dict())
    assert seen == ["sd_pre", "sd_post", "load_pre", "load_post"]


def test_hooks_fire_once_for_a_subclass_that_overrides_step():
    # torch wraps the subclass's `step` in its hook runner; our `step`, reached
    # through `super()`, must not run the hooks a second time.
    class Counting(AccumOptimizer):
        def step(self, *args, **kwargs):
            self.calls = getattr(self, "calls", 0) + 1
            return super().step(*args, **kwargs)

    params = _torch_params([np.zeros(2, np.float32)])
    opt = Counting(torch.optim.SGD(params, lr=0.1), merge_grad=2)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", a[1:], k)))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", a[1:], k)))
    for _ in range(2):
        _backward(params, [np.ones(2, np.float32)])
        opt.step(weight=2.0)
    assert opt.calls == 2 and opt.iterations == 1
    assert seen == [("pre", (), {"weight": 2.0}), ("post", (), {"weight": 2.0})] * 2


def test_hooks_see_the_call_as_made_and_profiler_labels_the_step():
    params = _torch_params([np.zeros(2, np.float32)])
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1), merge_grad=2)
    seen = []
    handle = opt.register_step_pre_hook(lambda o, a, k: seen.append((a[1:], k)))
    _backward(params, [np.ones(2, np.float32)])
    opt.step()
    closure_calls = []

    def closure():
        closure_calls.append(1)
        _backward(params, [np.ones(2, np.float32)])

    opt.step(closure)
    assert seen == [((), {}), ((closure,), {})] and closure_calls == [1]
    assert opt.iterations == 1
    handle.remove()
    # A global pre-hook alone (torch's own optimizers call it on every step).
    handle = register_optimizer_step_pre_hook(lambda o, a, k: seen.append(type(o).__name__))
    try:
        seen.clear()
        for _ in range(2):
            _backward(params, [np.ones(2, np.float32)])
            opt.step(weight=None)
    finally:
        handle.remove()
    assert seen == ["AccumOptimizer", "AccumOptimizer"]  # not again for the inner SGD
    # No hook now: the label still marks each micro-step while a profiler runs.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            _backward(params, [np.ones(2, np.float32)])
            opt.step()
    names = [e.name for e in prof.events()]
    assert names.count("Optimizer.step#AccumOptimizer.step") == 2
    assert names.count("Optimizer.step#SGD.step") == 1
    assert opt.iterations == 3


def test_add_param_group_reaches_inner_and_is_updated():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = AccumOptimizer(torch.optim.SGD([a], lr=0.1), merge_grad=2, use_ema=True)
    opt.add_param_group({"params": [b], "lr": 1.0})
    assert opt.param_groups is opt.inner_optimizer.param_groups
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["momentum"] == 0
    for _ in range(2):
        _backward([a, b], [np.ones(2, np.float32), np.ones(3, np.float32)])
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(a.detach(), torch.full((2,), -0.1))
    torch.testing.assert_close(b.detach(), torch.full((3,), -1.0))
    assert torch.equal(opt.state[b]["ema"], b.detach())  # first update: a copy


# -- bad input: same checks and messages as the Keras side, nothing changes ---------------

BAD_ARGS = [
    ({"merge_grad": 0}, ValueError),
    ({"merge_grad": "4"}, TypeError),
    ({"merge_grad": True}, TypeError),
    ({"reduction": "max"}, ValueError),
    ({"accumulator_dtype": torch.int32}, ValueError),
    ({"accumulator_dtype": 32}, TypeError),
    ({"use_ema": 1}, TypeError),
    ({"ema_momentum": 1.5}, ValueError),
    ({"ema_overwrite_frequency": 0}, ValueError),
    ({"clipnorm": -1.0}, ValueError),
    ({"clipvalue": float("inf")}, ValueError),
    ({"clipnorm": 1.0, "global_clipnorm": 1.0}, ValueError),
    ({"on_nonfinite": "warn"}, ValueError),
]


@pytest.mark.parametrize("kwargs,error", BAD_ARGS, ids=[str(k) for k, _ in BAD_ARGS])
def test_bad_arguments_use_shared_messages_and_change_nothing(kwargs, error):
    p = torch.nn.Parameter(torch.zeros(2))
    inner = torch.optim.SGD([p], lr=0.1)
    groups_before = copy.deepcopy(inner.state_dict())
    shared = dict(kwargs)
    if isinstance(shared.get("accumulator_dtype"), torch.dtype):
        shared["accumulator_dtype"] = str(shared["accumulator_dtype"]).removeprefix("torch.")
    with pytest.raises(error) as expected:
        _core.AccumConfig.create(allow_none_dtype=True, **shared)
    with pytest.raises(error) as actual:
        AccumOptimizer(inner, **kwargs)
    assert str(actual.value) == str(expected.value)
    assert "Received:" in str(actual.value)
    assert inner.state_dict() == groups_before
    assert not hasattr(inner, "_keras_accum_owner")


def test_bad_optimizer():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(
        TypeError, match=r"`optimizer` must be a torch.optim.Optimizer.*Received: optimizer='sgd'"
    ):
        AccumOptimizer("sgd")
    inner = AccumOptimizer(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="must not be an AccumOptimizer.*Received: optimizer="):
        AccumOptimizer(inner)
    with pytest.raises(ValueError, match="LBFGS"):
        AccumOptimizer(torch.optim.LBFGS([p]))


@pytest.mark.parametrize(
    "weight,error",
    [(-1.0, ValueError), (float("nan"), ValueError), ("2", TypeError), (True, TypeError)],
)
def test_bad_weight_changes_nothing(weight, error):
    params = _torch_params([np.zeros(2, np.float32)])
    opt = AccumOptimizer(torch.optim.SGD(params, lr=0.1), merge_grad=2)
    _backward(params, [np.ones(2, np.float32)])
    with pytest.raises(error) as actual:
        opt.step(weight=weight)
    with pytest.raises(error) as expected:
        _core.validate_weight(weight)
    assert str(actual.value) == str(expected.value)
    assert opt.micro_steps == 0 and not opt.state and torch.equal(params[0].grad, torch.ones(2))


def test_tensor_weight():
    params = _torch_params([np.zeros(1, np.float32)])
    opt = AccumOptimizer(torch.optim.SGD(params, lr=1.0), merge_grad=2)
    for g, w in ((1.0, 1), (4.0, 3)):
        _backward(params, [np.full(1, g, np.float32)])
        opt.step(weight=torch.tensor(w))
    # (1*1 + 3*4) / 4 = 3.25
    torch.testing.assert_close(params[0].detach(), torch.full((1,), -3.25))


_IMPORT_CHECK = """
import sys, warnings
# Any FutureWarning is an error. GradScaler would warn at each step() that it
# hands itself to the optimizer (the protocol AccumOptimizer relies on): we
# hide it inside scaler.step(opt) for our optimizers only.
warnings.simplefilter("error", FutureWarning)
import keras_accum.torch, torch
loaded = sorted(m for m in sys.modules if m.startswith(("tensorflow", "keras.")) or m == "keras")
assert not loaded, loaded
p = torch.nn.Parameter(torch.zeros(2))
opt = keras_accum.torch.AccumOptimizer(torch.optim.SGD([p], lr=0.1), merge_grad=2)
scaler = torch.amp.GradScaler("cpu")
for _ in range(2):
    scaler.scale(p.sum()).backward()
    scaler.step(opt)
    scaler.update()
assert opt.iterations == 1
"""


def test_import_loads_no_tensorflow_and_no_scaler_warning():
    subprocess.run([sys.executable, "-c", _IMPORT_CHECK], check=True, timeout=120)
