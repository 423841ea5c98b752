"""Closing a torch window (keras_accum/torch/_close.py and its kernels in _functional.py).

Complex parameters under every option, an update that raises anywhere
leaving everything as it was, norms that overflow only in their squares, and
`differentiable=True` inner optimizers. Numbers are checked against NumPy
(the contract's formulas) or plain torch optimizers stepped on the merged
gradient, never against the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import keras_accum.torch  # noqa: F401 (first: keras_accum then loads without TensorFlow)
from keras_accum.torch import AccumOptimizer, _close, _ema, _hooks, _window
from keras_accum.torch import _functional as F

try:  # tests/ on sys.path (pytest's default "prepend" import mode)
    from torch_compare import assert_same_tree
except ImportError:  # tests/ as a package
    from tests.torch_compare import assert_same_tree


def _add_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """What a backward does to `.grad`: sets it, or adds into it in place."""
    if p.grad is None:
        p.grad = g.clone()
    else:
        p.grad.add_(g)


# -- complex parameters under every option --------------------------------------------

COMPLEX_INNER = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
}
COMPLEX_OPTIONS = {
    "plain": {},
    "clipvalue": {"clipvalue": 0.4},
    "clipnorm": {"clipnorm": 0.5},
    "global_clipnorm": {"global_clipnorm": 0.7},
    "clipvalue_global_clipnorm": {"clipvalue": 0.4, "global_clipnorm": 0.5},
    "float64_accumulators": {"accumulator_dtype": torch.float64},
    "float32_accumulators": {"accumulator_dtype": "float32"},
    "raise": {"on_nonfinite": "raise"},
    "ignore": {"on_nonfinite": "ignore"},
    "ema": {"use_ema": True, "ema_momentum": 0.5},
    "weighted": {"reduction": "mean"},
}
_SHAPES = [((3, 2), torch.complex64), ((4,), torch.complex64), ((2,), torch.float32)]


def _np_clip(grads: list, cfg: dict) -> list:
    """The contract's clipping (point 7) on complex NumPy arrays.

    `clipvalue` clips the real and imaginary parts; the norms are those of
    `|z|`.
    """
    if cfg.get("clipvalue") is not None:
        c = cfg["clipvalue"]
        grads = [
            np.clip(g.real, -c, c) + 1j * np.clip(g.imag, -c, c) if np.iscomplexobj(g)
            else np.clip(g, -c, c)
            for g in grads
        ]  # fmt: skip
    norms = [math.sqrt(float(np.sum(np.abs(g) ** 2))) for g in grads]
    if cfg.get("clipnorm") is not None:
        c = cfg["clipnorm"]
        grads = [g * (c / max(n, c)) for g, n in zip(grads, norms)]
    if cfg.get("global_clipnorm") is not None:
        c = cfg["global_clipnorm"]
        total = math.sqrt(sum(n * n for n in norms))
        grads = [g * (c / max(total, c)) for g in grads]
    return grads


@pytest.mark.parametrize("option", list(COMPLEX_OPTIONS))
@pytest.mark.parametrize("inner", list(COMPLEX_INNER))
def test_complex_parameters_equal_the_inner_optimizer_on_the_merged_gradient(inner, option):
    """Complex parameters (torch optimizers that support them) under every option.

    The wrapper with merge_grad=2 against the plain optimizer stepped on the
    NumPy-merged and NumPy-clipped gradient. It raised: `aminmax` and `clamp`
    have no complex kernels.
    """
    cfg = COMPLEX_OPTIONS[option]
    weighted = option == "weighted"
    rng = np.random.default_rng(0)
    init = [
        (rng.standard_normal(s) + (1j * rng.standard_normal(s) if d.is_complex else 0)).astype(
            np.complex64 if d.is_complex else np.float32
        )
        for s, d in _SHAPES
    ]
    params = [torch.nn.Parameter(torch.tensor(a)) for a in init]
    plain_params = [torch.nn.Parameter(torch.tensor(a)) for a in init]
    opt = AccumOptimizer(COMPLEX_INNER[inner](params), merge_grad=2, **cfg)
    plain = COMPLEX_INNER[inner](plain_params)
    ema = None
    for window in range(3):
        micro = []
        for k in range(2):
            grads = [
                (rng.standard_normal(s) + (1j * rng.standard_normal(s) if d.is_complex else 0))
                for s, d in _SHAPES
            ]
            w = float(1 + (window + k) % 3) if weighted else 1.0
            micro.append((grads, w))
            for p, g, (_, d) in zip(params, grads, _SHAPES):
                _add_grad(p, torch.tensor(g, dtype=d))
            opt.step(weight=w if weighted else None)
            opt.zero_grad()
        total = sum(w for _, w in micro)
        merged = [sum(w * g[i] for g, w in micro) / total for i in range(len(_SHAPES))]
        merged = _np_clip(merged, cfg)
        for p, g, (_, d) in zip(plain_params, merged, _SHAPES):
            p.grad = torch.tensor(g, dtype=d)
        plain.step()
        raw = [p.detach().numpy().astype(np.complex128) for p in plain_params]
        m = 0.0 if ema is None else cfg.get("ema_momentum", 0.99)
        ema = raw if ema is None else [m * e + (1 - m) * r for e, r in zip(ema, raw)]
    assert opt.iterations == 3 and opt.skipped_updates == 0
    for p, q in zip(params, plain_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    if cfg.get("use_ema"):
        for p, e in zip(params, ema):
            np.testing.assert_allclose(opt.state[p]["ema"].numpy(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("part", ["real", "imag"])
def test_complex_nonfinite_parts_are_skipped_or_raised(part):
    """The finite check reads the real and imaginary parts of a complex gradient."""
    bad = complex(math.inf, 0.0) if part == "real" else complex(0.0, math.nan)
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    opt = AccumOptimizer(torch.optim.SGD([p], lr=1.0), merge_grad=2)
    _add_grad(p, torch.tensor([bad, 1.0], dtype=torch.complex64))
    opt.step()
    _add_grad(p, torch.tensor([1.0, 1.0], dtype=torch.complex64))
    opt.step()
    assert opt.skipped_updates == 1 and opt.iterations == 0
    assert torch.equal(p.detach(), torch.zeros(2, dtype=torch.complex64))

    q = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    opt = AccumOptimizer(torch.optim.SGD([q], lr=1.0), merge_grad=2, on_nonfinite="raise")
    _add_grad(q, torch.tensor([1.0 + 2.0j, -1.0j], dtype=torch.complex64))
    opt.step()  # finite: accumulated
    opt.zero_grad()
    _add_grad(q, torch.tensor([bad, 1.0], dtype=torch.complex64))
    with pytest.raises(FloatingPointError, match="non-finite gradient at micro-step 2"):
        opt.step()
    assert opt.window_steps == 1
    opt.zero_grad()
    _add_grad(q, torch.tensor([1.0, 1.0j], dtype=torch.complex64))
    opt.step()
    torch.testing.assert_close(q.detach(), torch.tensor([-1.0 - 1.0j, 0.0], dtype=torch.complex64))


# -- all or nothing: an update that raises leaves everything as it was ------------------


class _Boom(Exception):
    pass


def _everything(opt, params) -> dict:
    """Every piece of state one step() may touch, as copies (and `.grad` identities)."""

    def copy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        return x

    return {
        "counters": (
            opt.iterations,
            opt.micro_steps,
            opt.skipped_updates,
            opt.window_steps,
            opt.window_weight,
            opt._weighted,
        ),
        "last_grad_norm": copy(opt.last_grad_norm),
        "grad_ids": [id(p.grad) for p in params],
        "grads": [copy(p.grad) for p in params],
        "params": [copy(p) for p in params],
        "state": {i: copy(dict(opt.state[p])) for i, p in enumerate(params) if p in opt.state},
        "inner": {
            i: copy(dict(opt.inner_optimizer.state[p]))
            for i, p in enumerate(params)
            if p in opt.inner_optimizer.state
        },
    }


#: Every stage reached by the update of each mode below (all clip and keep an
#: EMA, and clipvalue keeps the divide apart from the norm clip).
SAFETY_MODES = {
    "grad": {},
    "weighted": {"weighted": True},
    "raise": {"on_nonfinite": "raise"},
    "float64_accumulators": {"accumulator_dtype": torch.float64},
    "ignore": {"on_nonfinite": "ignore"},
}
#: (module, function) of each stage of an update, in order; "inner" is the
#: inner optimizer's own step.
SAFETY_STAGES = {
    "window_sums": (_window, "window_sums"),
    "divide": (F, "divide"),
    "norms": (F, "norms"),
    "global_norm": (F, "global_norm"),
    "decide": (_close, "_decide"),
    "clip_value": (F, "clip_value"),
    "clip_global_norm": (F, "clip_global_norm"),
    "ema_prepare": (_ema, "prepare"),
    "hooks_off": (_hooks, "global_step_hooks_off"),
    "inner": None,
}


def _safety_run(mode: str, fail_at=None, monkeypatch=None, flush=False):
    """merge_grad=3: one update, then 2 micro-steps; the 3rd closes (or a flush)."""
    cfg = dict(SAFETY_MODES[mode])
    weighted = cfg.pop("weighted", False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    params = list(model.parameters())
    opt = AccumOptimizer(
        torch.optim.AdamW(params, lr=0.01),
        merge_grad=3,
        clipvalue=0.3,
        global_clipnorm=0.5,
        use_ema=True,
        ema_momentum=0.5,
        **cfg,
    )

    def micro_step(k):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step(weight=float(1 + k % 2) if weighted else None)

    for k in range(5):
        micro_step(k)
        opt.zero_grad()
    if fail_at is None:
        return opt, params, None
    before = _everything(opt, params) if flush else None
    if not flush:
        g = torch.Generator().manual_seed(5)
        x, y = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        before = _everything(opt, params)
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise _Boom(fail_at)

    if SAFETY_STAGES[fail_at] is None:
        monkeypatch.setattr(opt.inner_optimizer, "step", boom)
    else:
        monkeypatch.setattr(*SAFETY_STAGES[fail_at], boom)
    with pytest.raises(_Boom):
        if flush:
            opt.flush()
        else:
            opt.step(weight=float(1 + 5 % 2) if weighted else None)
    monkeypatch.undo()
    assert calls, f"{fail_at} was not reached"
    return opt, params, before


@pytest.mark.parametrize("stage", list(SAFETY_STAGES))
@pytest.mark.parametrize("mode", list(SAFETY_MODES))
def test_an_update_that_raises_leaves_everything_as_before(mode, stage, monkeypatch):
    """Whatever raises inside the closing step() leaves window, `.grad`, counters, state as they were.

    The failure is injected at each stage of the update; then the same
    step() again (nothing injected) continues as a run that never failed.
    Before, an error left `window_steps == merge_grad` and `.grad` divided in
    place.
    """
    opt, params, before = _safety_run(mode, stage, monkeypatch)
    assert_same_tree(_everything(opt, params), before)
    weighted = mode == "weighted"
    opt.step(weight=float(1 + 5 % 2) if weighted else None)
    ref_opt, ref_params, _ = _safety_run(mode)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        for m, p in zip(model.parameters(), ref_params):
            m.copy_(p)
    torch.nn.functional.mse_loss(model(x), y).backward()
    for m, p in zip(model.parameters(), ref_params):
        if p.grad is None:
            p.grad = m.grad.clone()
        else:
            p.grad.add_(m.grad)
    ref_opt.step(weight=float(1 + 5 % 2) if weighted else None)
    assert opt.iterations == ref_opt.iterations == 2
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["ema"], ref_opt.state[q]["ema"])


@pytest.mark.parametrize("stage", ["window_sums", "divide", "ema_prepare", "inner"])
def test_a_flush_that_raises_leaves_everything_as_before(stage, monkeypatch):
    opt, params, before = _safety_run("weighted", stage, monkeypatch, flush=True)
    assert_same_tree(_everything(opt, params), before)
    assert opt.flush() is True and opt.iterations == 2


def test_a_micro_step_that_raises_leaves_everything_as_before(monkeypatch):
    """A micro-step inside the window: the move into the side buffers fails."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AccumOptimizer(torch.optim.SGD([p], lr=1.0), merge_grad=3)
    p.sum().backward()
    opt.step(weight=1.0)
    (2 * p).sum().backward()
    before = _everything(opt, [p])

    def boom(*args, **kwargs):
        raise _Boom("accumulate")

    monkeypatch.setattr(_window, "_add", boom)
    with pytest.raises(_Boom):
        opt.step(weight=2.0)
    monkeypatch.undo()
    assert_same_tree(_everything(opt, [p]), before)
    opt.step(weight=2.0)
    assert opt.window_steps == 2 and torch.equal(opt.state[p]["accumulator"], torch.full((2,), 5.0))


def test_an_inner_optimizer_refusing_complex_parameters_changes_nothing():
    """Adafactor raises on complex parameters inside its step: the window stays."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    opt = AccumOptimizer(torch.optim.Adafactor([p], lr=0.01), merge_grad=2)
    _add_grad(p, torch.tensor([1.0 + 1.0j, 2.0], dtype=torch.complex64))
    opt.step()
    _add_grad(p, torch.tensor([1.0, 1.0j], dtype=torch.complex64))
    before = _everything(opt, [p])
    with pytest.raises(RuntimeError, match="Adafactor does not support complex parameters"):
        opt.step()
    assert_same_tree(_everything(opt, [p]), before)
    assert opt.window_steps == 1 and torch.equal(
        p.grad, torch.tensor([2.0 + 1.0j, 2.0 + 1.0j], dtype=torch.complex64)
    )


# -- norms whose squares overflow ---------------------------------------------------------


@pytest.mark.parametrize("merge_grad", [1, 4])
@pytest.mark.parametrize("on_nonfinite", ["skip", "ignore", "raise"])
@pytest.mark.parametrize("clip", ["global_clipnorm", "clipnorm"])
def test_norm_clip_of_a_finite_gradient_whose_squares_overflow(clip, on_nonfinite, merge_grad):
    """|g| > 1.8e19 is finite, its square is not (float32): the norm 2**70 is finite.

    The norm read inf and the clip applied a zero update. Expected: NumPy,
    in float64.
    """
    g = np.array([2.0**70, -(2.0**68), 3.0], np.float32)
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(1))
    opt = AccumOptimizer(
        torch.optim.SGD([p, q], lr=1.0), merge_grad=merge_grad, on_nonfinite=on_nonfinite,
        **{clip: 1.0},
    )  # fmt: skip
    for _ in range(merge_grad):
        _add_grad(p, torch.tensor(g))
        _add_grad(q, torch.ones(1))
        opt.step()
    assert opt.iterations == 1 and opt.skipped_updates == 0
    norm_p = float(np.linalg.norm(g.astype(np.float64)))
    expected_p = -g.astype(np.float64) / norm_p
    expected_q = -1.0 if clip == "clipnorm" else -1.0 / math.hypot(norm_p, 1.0)
    np.testing.assert_allclose(p.detach().numpy(), expected_p, rtol=1e-6)
    np.testing.assert_allclose(q.detach().numpy(), [expected_q], rtol=1e-6)
    assert math.isfinite(float(opt.last_grad_norm))
    np.testing.assert_allclose(float(opt.last_grad_norm), math.hypot(norm_p, 1.0), rtol=1e-6)


def test_global_norm_whose_per_tensor_norms_are_finite_but_whose_sum_overflows():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = AccumOptimizer(torch.optim.SGD([p, q], lr=1.0), global_clipnorm=1.0)
    p.grad, q.grad = torch.full((1,), 1.5e19), torch.full((1,), -1.5e19)
    opt.step()
    total = math.hypot(1.5e19, 1.5e19)
    np.testing.assert_allclose(float(opt.last_grad_norm), total, rtol=1e-6)
    np.testing.assert_allclose([p.item(), q.item()], [-1.5e19 / total, 1.5e19 / total], rtol=1e-6)


def test_float64_norms_are_combined_in_float64():
    """A float64 gradient's norm of 1e200 is not rounded to float32 (inf) when combined."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    q = torch.nn.Parameter(torch.zeros(1))
    opt = AccumOptimizer(torch.optim.SGD([p, q], lr=1.0), global_clipnorm=1.0)
    p.grad = torch.tensor([1e200, 0.0], dtype=torch.float64)
    q.grad = torch.ones(1)
    opt.step()
    assert opt.last_grad_norm.dtype == torch.float64
    assert float(opt.last_grad_norm) == pytest.approx(1e200, rel=1e-12)
    assert p.detach().tolist() == pytest.approx([-1.0, 0.0], rel=1e-12)
    assert q.item() == 0.0  # -1e-200 in float32


# -- differentiable=True ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"merge_grad": 2}, {"clipnorm": 1.0}, {"clipvalue": 1.0}, {"global_clipnorm": 1.0}],
    ids=["merge_grad", "clipnorm", "clipvalue", "global_clipnorm"],
)
def test_differentiable_inner_with_a_merge_or_a_clip_is_refused(kwargs):
    """The merge and the clip run outside autograd: d p / d g would be wrong.

    SGD(lr=0.9) with merge_grad=2 gave d p / d g1 = -0.9 or None (-0.45 is right).
    """
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    inner = torch.optim.SGD([p], lr=0.9, differentiable=True)
    with pytest.raises(
        ValueError,
        match=r"^`optimizer` must not have `differentiable=True` unless merge_grad=1 and no "
        r"clipping is set: .* Received: optimizer with differentiable=True, merge_grad=",
    ):
        AccumOptimizer(inner, **kwargs)


_DIFFERENTIABLE = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.9, differentiable=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.1, differentiable=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1, differentiable=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, differentiable=True),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=0.1, differentiable=True),
}


@pytest.mark.parametrize("name", list(_DIFFERENTIABLE))
def test_differentiable_inner_alone_has_correct_derivatives(name):
    """merge_grad=1, no clip: the gradient is handed on as it came; gradcheck passes.

    The derivative is checked by finite differences (`torch.autograd.gradcheck`),
    the value against the plain optimizer's step.
    """

    def step(p, g, wrapped):
        p = p.clone()
        p.grad = g
        inner = _DIFFERENTIABLE[name]([p])
        (AccumOptimizer(inner, use_ema=True) if wrapped else inner).step()
        return p

    g0 = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    p0 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, g: step(p, g, True), (p0, g0))
    assert torch.equal(step(p0, g0, True), step(p0, g0, False))


def test_differentiable_inner_refuses_a_transformed_gradient_at_step():
    p = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True).clone()
    opt = AccumOptimizer(torch.optim.SGD([p], lr=0.9, differentiable=True), reduction="sum")
    p.grad = torch.tensor([0.5, 0.5], dtype=torch.float64, requires_grad=True)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"The inner optimizer has `differentiable=True`"):
        opt.step(weight=2.0)
    assert torch.equal(p.detach(), before) and opt.micro_steps == 0 and opt.iterations == 0
