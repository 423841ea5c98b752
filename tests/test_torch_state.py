"""AccumOptimizer.state_dict()/load_state_dict(): lockstep, fresh-process resume, refusals.

As in torch's own test_optim: an optimizer restored from a mid-window state
dict and the original run side by side and must agree bit for bit at every
step; a resume in a fresh process must give the uninterrupted run's weights.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import subprocess
import sys

import pytest
import torch

from keras_accum.torch import AccumOptimizer

try:  # tests/ on sys.path (pytest's default "prepend" import mode)
    from torch_compare import assert_same_tree
except ImportError:  # tests/ as a package
    from tests.torch_compare import assert_same_tree

# -- a small training set-up, rebuilt identically in a subprocess -------------------------

CONFIGS = {
    # Window in .grad, momentum state, EMA, a scheduler.
    "grad_sgd_ema": dict(
        dtype=torch.float32,
        inner=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        kwargs=dict(merge_grad=3, use_ema=True, ema_momentum=0.8, global_clipnorm=1.0),
        weighted=False,
    ),
    # bf16 parameters, float32 side buffers and EMA (both must stay float32).
    "bf16_fp32_adamw": dict(
        dtype=torch.bfloat16,
        inner=lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
        kwargs=dict(merge_grad=4, accumulator_dtype=torch.float32, use_ema=True, ema_warmup=True),
        weighted=False,
    ),
    # Per-micro-step weights: side buffers in the parameter dtype.
    "weighted_adam": dict(
        dtype=torch.float32,
        inner=lambda ps: torch.optim.Adam(ps, lr=0.01),
        kwargs=dict(merge_grad=3, clipvalue=0.5),
        weighted=True,
    ),
}


def _build(name: str):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    model.to(cfg["dtype"])
    opt = AccumOptimizer(cfg["inner"](model.parameters()), **cfg["kwargs"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    return model, opt, sched


def _micro_step(name: str, model, opt, sched, k: int) -> None:
    """Micro-step `k` of the run: data and weight depend on `k` only."""
    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(5, 4, generator=g).to(cfg["dtype"])
    y = torch.randn(5, 2, generator=g).to(cfg["dtype"])
    torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
    opt.step(weight=float(1 + k % 3) if cfg["weighted"] else None)
    sched.step()
    opt.zero_grad()


def _load(buffer_or_path):
    # Users load with torch.load's defaults: weights_only=True.
    return torch.load(buffer_or_path, weights_only=True)


def resume_in_this_process(name: str, path_in: str, path_out: str, start: int, stop: int):
    """The subprocess half of the fresh-process resume (called by name)."""
    model, opt, sched = _build(name)
    saved = _load(path_in)
    model.load_state_dict(saved["model"])
    sched.load_state_dict(saved["sched"])
    opt.load_state_dict(saved["opt"])
    for k in range(start, stop):
        _micro_step(name, model, opt, sched, k)
    torch.save(
        {"params": [p.detach() for p in model.parameters()], "opt": opt.state_dict()}, path_out
    )


def _save_bytes(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# -- lockstep ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_restored_optimizer_runs_in_lockstep(name):
    model, opt, sched = _build(name)
    for k in range(5):  # stops mid-window for every config
        _micro_step(name, model, opt, sched, k)
    assert opt.window_steps > 0
    saved = _load(
        _save_bytes(
            {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
        )
    )

    model2, opt2, sched2 = _build(name)
    model2.load_state_dict(saved["model"])  # weights only: .grad is not in it
    sched2.load_state_dict(saved["sched"])
    opt2.load_state_dict(saved["opt"])

    assert opt2.param_groups is opt2.inner_optimizer.param_groups
    assert (opt2.iterations, opt2.micro_steps, opt2.window_steps) == (
        opt.iterations,
        opt.micro_steps,
        opt.window_steps,
    )
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key, value in opt.state.get(p, {}).items():
            # torch's loader would cast these to bf16; they must stay float32.
            assert opt2.state[p2][key].dtype == value.dtype
            assert torch.equal(opt2.state[p2][key], value)
        if p.grad is None:
            assert p2.grad is None
        else:
            assert torch.equal(p2.grad, p.grad)

    for k in range(5, 15):
        _micro_step(name, model, opt, sched, k)
        _micro_step(name, model2, opt2, sched2, k)
        for p, p2 in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p, p2), f"differs after micro-step {k}"
            for key, value in opt.state.get(p, {}).items():
                assert torch.equal(opt2.state[p2][key], value)
        assert (
            opt2.inner_optimizer.param_groups[0]["lr"] == opt.inner_optimizer.param_groups[0]["lr"]
        )
    assert opt.iterations >= 3
    # The scheduler on the restored wrapper still drives the inner LR.
    assert opt2.inner_optimizer.param_groups[0]["lr"] == pytest.approx(
        0.9**opt.iterations * opt.inner_optimizer.defaults["lr"]
    )


@pytest.mark.parametrize("name", ["grad_sgd_ema", "bf16_fp32_adamw"])
def test_rewinding_a_running_optimizer_continues_from_the_loaded_state(name):
    """`load_state_dict` into a wrapper that ran on past the checkpoint (a rewind).

    The EMA must go on from the loaded tensors, not from those the wrapper
    updated before the load: the run after the rewind agrees bit for bit with
    a fresh wrapper restored from the same checkpoint.
    """
    model, opt, sched = _build(name)
    for k in range(5):
        _micro_step(name, model, opt, sched, k)
    checkpoint = _save_bytes(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    ).getvalue()
    for k in range(5, 13):  # two more updates at least, then rewind
        _micro_step(name, model, opt, sched, k)
    assert opt.iterations >= 3
    ref_model, ref_opt, ref_sched = _build(name)
    for m, o, s in ((model, opt, sched), (ref_model, ref_opt, ref_sched)):
        # One load each: torch's loader keeps the loaded tensors, so a shared
        # state dict would tie the two optimizers' state together.
        saved = _load(io.BytesIO(checkpoint))
        m.load_state_dict(saved["model"])
        s.load_state_dict(saved["sched"])
        o.load_state_dict(saved["opt"])

    for k in range(5, 15):
        _micro_step(name, model, opt, sched, k)
        _micro_step(name, ref_model, ref_opt, ref_sched, k)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert torch.equal(p, q), f"differs after micro-step {k}"
            assert torch.equal(opt.state[p]["ema"], ref_opt.state[q]["ema"]), k


# -- fresh-process resume --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grad_sgd_ema", "bf16_fp32_adamw"])
def test_resume_in_fresh_process_is_bit_identical(name, tmp_path):
    start, stop = 7, 13  # save after micro-step 7: mid-window for both
    model, opt, sched = _build(name)
    for k in range(start):
        _micro_step(name, model, opt, sched, k)
    assert opt.window_steps > 0
    path_in, path_out = str(tmp_path / "ckpt.pt"), str(tmp_path / "out.pt")
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path_in
    )
    for k in range(start, stop):
        _micro_step(name, model, opt, sched, k)

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {tests_dir!r}); import test_torch_state as t; "
        f"t.resume_in_this_process({name!r}, {path_in!r}, {path_out!r}, {start}, {stop})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    resumed = _load(path_out)
    for p, q in zip(model.parameters(), resumed["params"]):
        assert torch.equal(p.detach(), q)
    mine = opt.state_dict()
    for i, s in mine["state"].items():
        for key, value in s.items():
            assert torch.equal(resumed["opt"]["state"][i][key], value)
    assert int(resumed["opt"]["accum"]["iterations"]) == opt.iterations


# -- refusals ------------------------------------------------------------------------------------


def _small(inner=torch.optim.SGD, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = AccumOptimizer(inner(model.parameters(), lr=0.1), **kwargs)
    return model, opt


def _one_micro_step(model, opt):
    model(torch.ones(2, 3)).sum().backward()
    opt.step()


@pytest.mark.parametrize(
    "saved_kwargs,loader_kwargs,loader_inner,message",
    [
        (
            dict(merge_grad=4),
            dict(merge_grad=2),
            torch.optim.SGD,
            "merge_grad: saved 4, this optimizer 2",
        ),
        (dict(merge_grad=2), dict(merge_grad=2, reduction="sum"), torch.optim.SGD, "reduction"),
        (
            dict(merge_grad=2),
            dict(merge_grad=2, accumulator_dtype="float64"),
            torch.optim.SGD,
            "accumulator_dtype",
        ),
        (dict(merge_grad=2), dict(merge_grad=2, use_ema=True), torch.optim.SGD, "use_ema"),
        (dict(merge_grad=2), dict(merge_grad=2), torch.optim.Adam, "inner_optimizer: saved 'SGD'"),
    ],
)
def test_loading_differently_configured_state_raises_and_changes_nothing(
    saved_kwargs, loader_kwargs, loader_inner, message
):
    model, opt = _small(**saved_kwargs)
    _one_micro_step(model, opt)
    saved = copy.deepcopy(opt.state_dict())
    model2, opt2 = _small(loader_inner, **loader_kwargs)
    _one_micro_step(model2, opt2)
    grads = [None if p.grad is None else p.grad.clone() for p in model2.parameters()]
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match="differently configured AccumOptimizer") as error:
        opt2.load_state_dict(saved)
    assert message in str(error.value)
    assert opt2.micro_steps == 1 and opt2.window_steps == 1
    for p, g in zip(model2.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    after = opt2.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for i, s in before["state"].items():
        for key, value in s.items():
            assert torch.equal(after["state"][i][key], value)


def test_loading_a_plain_optimizer_state_raises():
    model, opt = _small(merge_grad=2)
    with pytest.raises(ValueError, match="not saved by an AccumOptimizer"):
        opt.load_state_dict(opt.inner_optimizer.state_dict())


def test_loading_state_of_other_parameters_raises():
    _, opt = _small(merge_grad=2)
    saved = opt.state_dict()
    other = AccumOptimizer(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), merge_grad=2
    )
    with pytest.raises(ValueError, match="nothing was loaded"):
        other.load_state_dict(saved)


def test_clipping_and_ema_momentum_may_change_between_save_and_resume():
    model, opt = _small(merge_grad=2, use_ema=True, ema_momentum=0.9)
    _one_micro_step(model, opt)
    model2, opt2 = _small(merge_grad=2, use_ema=True, ema_momentum=0.5, clipnorm=1.0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.window_steps == 1 and opt2.config.clipnorm == 1.0


# -- a state dict written by the format-1 code (tests/data/README.md) --------------------------

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
_STORED = os.path.join(_DATA, "torch_format1_adamw_merge4_ema.pt")


def _maker():
    """tests/data/make_torch_state.py, the script that wrote the stored file."""
    spec = importlib.util.spec_from_file_location(
        "make_torch_state", os.path.join(_DATA, "make_torch_state.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stored_run(stored, run, start: int, stop: int, model, opt) -> None:
    for b in stored["batches"][start:stop]:
        torch.nn.functional.mse_loss(model(b["x"]), b["y"]).backward()
        opt.step(weight=b["weight"] if run["weighted"] else None)
        opt.zero_grad()


@pytest.mark.parametrize("mode", ["weighted", "grad"])
def test_state_dict_stored_by_the_format_1_code_loads_and_resumes(mode):
    """A mid-window state dict written by commit a0bbb76 (torch 2.13.0) loads and resumes.

    The load is checked against the values stored in the same file (counters,
    the open window where its mode keeps it, EMA, inner state; the dict
    written again equals the dict read, but for the format-2 changes). The resumed
    run is checked against the uninterrupted run replayed here from the
    stored initial weights and micro-batches, and against the end state
    stored in the file, to float32 round-off (the file may come from another
    CPU).
    """
    make = _maker()
    stored = _load(_STORED)
    run = stored[mode]
    saved = run["opt"]
    accum = saved["accum"]

    model = make.build()
    model.load_state_dict(run["model"])
    opt = make.make_optimizer(model)
    opt.load_state_dict(copy.deepcopy(saved))
    params = list(model.parameters())
    assert (opt.iterations, opt.micro_steps, opt.window_steps, opt.skipped_updates) == (
        int(accum["iterations"]),
        int(accum["micro_steps"]),
        int(accum["window_steps"]),
        int(accum["skipped_updates"]),
    )
    assert opt.window_steps == 2 and opt.iterations == 1
    assert opt.window_weight == float(accum["window_weight"])
    for i, p in enumerate(params):
        assert torch.equal(opt.state[p]["ema"], saved["state"][i]["ema"])
        window = opt.state[p]["accumulator"] if run["weighted"] else p.grad
        assert torch.equal(window, saved["state"][i]["accumulator"])
        if not run["weighted"]:
            assert "accumulator" not in opt.state[p]  # the window is back in `.grad`
    assert_same_tree(opt.inner_optimizer.state_dict()["state"], saved["inner"]["state"])
    # The dict written again is the dict read, in format 2: the same but for
    # the version and the marker group that makes a plain optimizer refuse it.
    again = opt.state_dict()
    assert again["accum"]["format_version"] == again["accum"]["signature"]["format_version"] == 2
    assert again["param_groups"][-1]["params"] == [] and "keras_accum" in again["param_groups"][-1]
    again["param_groups"] = again["param_groups"][:-1]
    again["accum"]["format_version"] = again["accum"]["signature"]["format_version"] = 1
    assert_same_tree(again, saved)

    start, stop = int(stored["save_after"]), len(stored["batches"])
    _stored_run(stored, run, start, stop, model, opt)

    replay_model = make.build()
    replay_model.load_state_dict(run["init"])
    replay_opt = make.make_optimizer(replay_model)
    _stored_run(stored, run, 0, stop, replay_model, replay_opt)

    final = run["final"]
    assert opt.iterations == replay_opt.iterations == final["iterations"] == 3
    assert opt.micro_steps == replay_opt.micro_steps == final["micro_steps"]
    close = dict(rtol=1e-5, atol=1e-6)
    for i, ((name, p), q) in enumerate(zip(model.named_parameters(), replay_model.parameters())):
        torch.testing.assert_close(p.detach(), q.detach(), **close)
        torch.testing.assert_close(p.detach(), final["model"][name], **close)
        torch.testing.assert_close(opt.state[p]["ema"], replay_opt.state[q]["ema"], **close)
        torch.testing.assert_close(opt.state[p]["ema"], final["ema"][i], **close)


# -- what a state dict is to torch ----------------------------------------------------------

PLAIN = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "muon": lambda ps: torch.optim.Muon(ps, lr=0.01),
}


@pytest.mark.parametrize("mid_window", [False, True], ids=["boundary", "mid_window"])
@pytest.mark.parametrize("name", list(PLAIN))
def test_a_plain_optimizer_refuses_the_wrappers_state_dict(name, mid_window):
    """Loaded into a plain optimizer, the wrapper's dict fails loudly (docs/semantics.md, point 12).

    It was accepted silently, the wrapper's own per-parameter state taken for
    the optimizer's (Adam restarted its moments, SGD momentum and Muon went
    on wrong, a mid-window one raised `KeyError: 'step'` at the next step).
    `state_dict()["inner"]` is what a plain optimizer loads: the inner
    optimizer's own state dict, which then runs in lockstep with it.
    """
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4, 2))]
    opt = AccumOptimizer(PLAIN[name](weights), merge_grad=2, use_ema=True)
    for k in range(5 if mid_window else 4):
        sum((w * 0.1 * (k + 1)).sum() for w in weights).backward()
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()
    assert opt.window_steps == (1 if mid_window else 0)

    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    plain = PLAIN[name](copies)
    before = copy.deepcopy(plain.state_dict())
    with pytest.raises(ValueError, match="different number of parameter groups"):
        plain.load_state_dict(saved)
    assert plain.state_dict() == before  # nothing was loaded
    assert saved["param_groups"][-1]["params"] == []
    assert "AccumOptimizer.load_state_dict" in saved["param_groups"][-1]["keras_accum"]

    # A copy: torch's loader keeps the loaded tensors, which are the inner
    # optimizer's own (a state dict holds the live state tensors).
    plain.load_state_dict(copy.deepcopy(saved["inner"]))
    inner = opt.inner_optimizer
    for p, q in zip(weights, copies):
        for key, value in inner.state[p].items():
            assert torch.equal(torch.as_tensor(plain.state[q][key]), torch.as_tensor(value))
    for _ in range(2):
        for p, q in zip(weights, copies):
            p.grad = torch.full_like(p, 0.5)
            q.grad = torch.full_like(q, 0.5)
        inner.step()
        plain.step()
        for p, q in zip(weights, copies):
            assert torch.equal(p, q)


def test_a_mid_window_state_dict_is_a_snapshot():
    """A later backward() or step() does not change a state dict already taken.

    Its `"accumulator"` was the live `.grad` (the next backward changed the
    saved dict) and, with side buffers, its per-parameter dict was
    `opt.state[p]` itself (the closing step removed the saved window).
    """
    for weighted in (False, True):
        p = torch.nn.Parameter(torch.zeros(3))
        opt = AccumOptimizer(torch.optim.SGD([p], lr=0.1), merge_grad=3, use_ema=True)
        w = 1.0 if weighted else None
        for k in range(4):  # one update, then one micro-step
            (p * (k + 1)).sum().backward()
            opt.step(weight=w)
            opt.zero_grad()
        saved = opt.state_dict()
        kept = copy.deepcopy(saved)
        assert torch.equal(saved["state"][0]["accumulator"], torch.full((3,), 4.0))
        (p * 5).sum().backward()  # adds into `.grad` (default mode)
        opt.step(weight=w)  # adds into the buffer (side buffers)
        opt.zero_grad()
        (p * 6).sum().backward()
        opt.step(weight=w)  # the closing step removes the window's key
        assert saved["state"].keys() == kept["state"].keys()
        assert saved["state"][0].keys() == kept["state"][0].keys() == {"ema", "accumulator"}
        assert torch.equal(saved["state"][0]["accumulator"], kept["state"][0]["accumulator"])
        assert_same_tree(saved["accum"], kept["accum"])
        # The EMA, as the inner optimizer's state (and any torch optimizer's
        # state tensors), is the live tensor: the update moved it.
        assert saved["state"][0]["ema"] is opt.state[p]["ema"]


def test_the_wrapper_state_and_the_inner_state_stay_apart():
    """`opt.state` holds the wrapper's own per-parameter state; the inner one is nested.

    A torch user reading `opt.state[p]["exp_avg"]` finds it in
    `opt.inner_optimizer.state[p]` (docs/semantics.md, point 15): the two are
    never merged, in memory as in `state_dict()` (`"inner"`).
    """
    p = torch.nn.Parameter(torch.zeros(3))
    opt = AccumOptimizer(torch.optim.Adam([p], lr=0.1), merge_grad=2, use_ema=True)
    for _ in range(3):
        p.sum().backward()
        opt.step(weight=1.0)
    assert set(opt.state[p]) == {"ema", "accumulator"}
    assert set(opt.inner_optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    saved = opt.state_dict()
    assert set(saved["state"][0]) == {"ema", "accumulator"}
    assert set(saved["inner"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_a_non_parameter_key_in_state_loads_as_in_torch():
    """torch's test_state_dict_pre_hook: a hook adds `state["test"]`; the dict loads.

    A key that is no parameter index was refused ("unknown parameter
    index"); torch keeps it in `opt.state`, and so does the wrapper now.
    """
    results = []
    for wrap in (False, True):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=0.1)
        if wrap:
            opt = AccumOptimizer(opt, merge_grad=2)
        opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))
        saved = opt.state_dict()
        assert saved["state"]["test"] == 1
        q = torch.nn.Parameter(torch.zeros(2))
        fresh = torch.optim.SGD([q], lr=0.1)
        fresh = AccumOptimizer(fresh, merge_grad=2) if wrap else fresh
        fresh.load_state_dict(saved)
        results.append(fresh.state["test"])
        q.grad = torch.ones(2)
        fresh.step()
    assert results == [1, 1]
