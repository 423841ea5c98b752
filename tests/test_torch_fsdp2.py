"""`opt.no_sync(model)` under FSDP2 (`fully_shard`) and DDP: one reduction per window.

One spawned run (two gloo processes on 127.0.0.1, `fully_shard` on a `cpu`
DeviceMesh) checks, with the README's FSDP2 loop:

* the weights and the EMA of the sharded parameters equal the NumPy oracle's
  single-process large-batch run (SGD with momentum, `global_clipnorm` active,
  so the clip uses the norm across both shards) to 1e-5;
* micro-steps that do not update make no reduce-scatter (the collective is
  counted after every micro-step), also when the root module is not sharded
  and only its layers are;
* `state_dict()` and `flush()` refuse a window whose last micro-step skipped
  the reduction (its partial sums sit in FSDP2's unsharded buffers), and
  change nothing;
* a mid-window save (per-rank `model.state_dict()` and `opt.state_dict()`,
  `torch.load(weights_only=True)`), taken after a micro-step run outside
  `no_sync`, resumes in fresh modules to weights, EMA and counters
  bit-identical to the same loop run without interruption.

The DDP recipe is run by `tests/test_torch_distributed.py`; the unit tests at
the end check `no_sync` on plain modules and the DDP refusals without
spawning.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import RefAccum, RefSGD
from test_torch_distributed import (
    LARGE_BATCH,
    MERGE_GRAD,
    N_UPDATES,
    WORLD,
    _data,
    _FakeDDP,
    _free_port,
    _micro_slice,
    _model,
)

from keras_accum.torch import AccumOptimizer

# Process groups on 127.0.0.1: one at a time (see pyproject.toml).
pytestmark = pytest.mark.xdist_group("processes")

LR, MOMENTUM = 0.1, 0.9
CLIP = 0.05  # below every merged gradient's norm here: the clip acts
EMA = 0.9
SAVE_EVERY = 5  # one mid-window save, after micro-step 5 (window 2, position 2)
N_MICRO = N_UPDATES * MERGE_GRAD
GROUPS_WITH_PARAMS = 2  # the two Linear layers; the root holds no parameter


def _shard(mesh, root: bool):
    """`_model()` with each Linear `fully_shard`-ed, and the root too if `root`."""
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    if root:
        fully_shard(model, mesh=mesh)
    return model


def _optimizer(model):
    return AccumOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
        merge_grad=MERGE_GRAD,
        global_clipnorm=CLIP,
        use_ema=True,
        ema_momentum=EMA,
    )


def _micro_batches(rank):
    x, y = _data()
    slices = [_micro_slice(u, k, rank) for u in range(N_UPDATES) for k in range(MERGE_GRAD)]
    return [(x[s], y[s]) for s in slices]


def _readme_loop(model, opt, micro_batches, start=0, save_every=None, save=None, after=None):
    """The README's FSDP2 loop (with its mid-window save when `save_every` is set)."""
    loss_fn = torch.nn.functional.mse_loss
    for i, (x, y) in enumerate(micro_batches, start=start):
        save_now = save_every is not None and (i + 1) % save_every == 0
        # The micro-step before a mid-window save reduces: run it outside no_sync.
        with contextlib.nullcontext() if save_now else opt.no_sync(model):
            loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if save_now:
            save()
        if after is not None:
            after()


def _full(tensors):
    return [t.full_tensor().detach().clone() for t in tensors]


def _snapshot(model, opt):
    params = list(model.parameters())
    return {
        "params": _full(params),
        "ema": _full(opt.state[p]["ema"] for p in params),
        "momentum": _full(opt.inner_optimizer.state[p]["momentum_buffer"] for p in params),
        "counters": (opt.iterations, opt.micro_steps, opt.window_steps),
        "norm": float(opt.last_grad_norm.full_tensor()),
    }


@contextlib.contextmanager
def _cpu_mesh(rank: int, port: int):
    """This process's gloo group on 127.0.0.1 and a 1-D `cpu` DeviceMesh over it."""
    from torch.distributed.device_mesh import init_device_mesh

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        yield init_device_mesh("cpu", (WORLD,))
        dist.barrier()  # no rank tears down while the other still talks
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    with _cpu_mesh(rank, port) as mesh:
        # Count FSDP2's reduce-scatters (its default comm calls this).
        count = [0]
        reduce_scatter = dist.reduce_scatter_single

        def counting(*args, **kwargs):
            count[0] += 1
            return reduce_scatter(*args, **kwargs)

        dist.reduce_scatter_single = counting
        batches = _micro_batches(rank)
        result = {}

        # Run A: the README loop, root and layers sharded. Micro-step 1 by
        # hand first, to check the refusals of a window held by FSDP2.
        model = _shard(mesh, root=True)
        opt = _optimizer(model)
        _readme_loop(model, opt, batches[:1])
        refusals = []
        for call in (opt.state_dict, opt.flush):
            try:
                call()
            except RuntimeError as e:
                refusals.append(str(e))
        result["refusals"] = refusals
        result["after_refusals"] = (opt.iterations, opt.micro_steps, opt.window_steps)
        counts = [count[0]]
        _readme_loop(model, opt, batches[1:], start=1, after=lambda: counts.append(count[0]))
        result["counts"] = counts
        result["run"] = _snapshot(model, opt)

        # Run C: layers sharded, root plain; the save schedule, no interruption.
        count[0] = 0
        model = _shard(mesh, root=False)
        opt = _optimizer(model)
        _readme_loop(model, opt, batches, save_every=SAVE_EVERY, save=lambda: None)
        result["scheduled_count"] = count[0]
        result["scheduled"] = _snapshot(model, opt)

        # Run D: the same, saved after micro-step SAVE_EVERY and resumed in
        # fresh modules from the per-rank files.
        path = os.path.join(out_dir, f"ckpt-{rank}.pt")
        model = _shard(mesh, root=False)
        opt = _optimizer(model)

        def save():
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)

        _readme_loop(model, opt, batches[:SAVE_EVERY], save_every=SAVE_EVERY, save=save)
        ckpt = torch.load(path, weights_only=True)
        resumed = _shard(mesh, root=False)
        resumed.load_state_dict(ckpt["model"])
        resumed_opt = _optimizer(resumed)
        resumed_opt.load_state_dict(ckpt["opt"])
        result["resumed_window"] = resumed_opt.window_steps
        _readme_loop(
            resumed, resumed_opt, batches[SAVE_EVERY:], start=SAVE_EVERY, save_every=SAVE_EVERY
        )
        result["resumed"] = _snapshot(resumed, resumed_opt)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))


def _large_batch_oracle():
    """The NumPy oracle fed the large-batch gradients: merge_grad=1 on WORLD * MERGE_GRAD
    micro-batches at once, global clip and EMA by the contract's formulas."""
    model = _model()
    params = list(model.parameters())
    oracle = RefAccum(
        [p.detach().numpy() for p in params],
        RefSGD(LR, momentum=MOMENTUM),
        global_clipnorm=CLIP,
        use_ema=True,
        ema_momentum=EMA,
    )
    x, y = _data()
    norms = []
    for u in range(N_UPDATES):
        with torch.no_grad():
            for p, value in zip(params, oracle.params):
                p.copy_(torch.from_numpy(value))
        s = slice(u * LARGE_BATCH, (u + 1) * LARGE_BATCH)
        grads = torch.autograd.grad(torch.nn.functional.mse_loss(model(x[s]), y[s]), params)
        oracle.step([g.numpy() for g in grads])
        norms.append(float(oracle.last_grad_norm))
    return oracle, norms


@pytest.mark.slow
def test_fsdp2_no_sync_equals_large_batch_and_resumes_mid_window(tmp_path):
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    oracle, norms = _large_batch_oracle()

    run = result["run"]
    assert run["counters"] == (N_UPDATES, N_MICRO, 0)
    assert norms[-1] > CLIP  # the clip acted, on the norm across both shards
    np.testing.assert_allclose(run["norm"], norms[-1], rtol=1e-5)
    for got, want in zip(run["params"], oracle.params):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    for got, want in zip(run["ema"], oracle.ema):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)

    # Reduce-scatters after each micro-step: one per sharded layer, only in
    # the backward of a micro-step that updates.
    expected = [GROUPS_WITH_PARAMS * ((i + 1) // MERGE_GRAD) for i in range(N_MICRO)]
    assert result["counts"] == expected

    # A window held unreduced by FSDP2 is neither saved nor flushed.
    assert len(result["refusals"]) == 2
    for message in result["refusals"]:
        assert "no_sync" in message and "FSDP2" in message
    assert result["after_refusals"] == (0, 1, 1)

    # Root not sharded: its layers still skip. Syncs: 3 updates and the
    # micro-step before the save.
    assert result["scheduled_count"] == GROUPS_WITH_PARAMS * (N_UPDATES + 1)
    scheduled, resumed = result["scheduled"], result["resumed"]
    # Reducing part of a window early changes only the rounding.
    for got, want in zip(scheduled["params"], run["params"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # The save held the open window (2 micro-steps), and the resume is exact.
    assert result["resumed_window"] == SAVE_EVERY - MERGE_GRAD
    assert resumed["counters"] == scheduled["counters"] == (N_UPDATES, N_MICRO, 0)
    for key in ("params", "ema", "momentum"):
        for got, want in zip(resumed[key], scheduled[key]):
            assert torch.equal(got, want), key


def _nonfinite_worker(rank: int, port: int, out_dir: str) -> None:
    """One sharded parameter per case; rank 0's shard alone holds the inf."""
    from torch.distributed.tensor import Shard, distribute_tensor

    with _cpu_mesh(rank, port) as mesh:
        result = {}
        for case, value, kwargs in (
            ("inf", float("inf"), {}),
            ("inf_clip", float("inf"), {"global_clipnorm": 1.0}),
            ("norm_overflows", 1e20, {}),
        ):
            p = torch.nn.Parameter(distribute_tensor(torch.zeros(4), mesh, [Shard(0)]))
            opt = AccumOptimizer(torch.optim.SGD([p], lr=1.0), merge_grad=2, **kwargs)
            for k in range(2):
                g = torch.ones(4) if value == float("inf") else torch.full((4,), value)
                if k == 1 and value == float("inf"):
                    g[0] = value  # element 0 lies in rank 0's shard
                grad = distribute_tensor(g, mesh, [Shard(0)])
                if p.grad is None:
                    p.grad = grad
                else:
                    p.grad += grad  # in place, as autograd adds
                opt.step()
            result[case] = (opt.iterations, opt.skipped_updates, p.full_tensor().tolist())
        torch.save(result, os.path.join(out_dir, f"nonfinite{rank}.pt"))


def test_nonfinite_window_of_sharded_gradients_is_skipped_on_every_rank(tmp_path):
    # The skip check's exact path (a norm that is not finite) on DTensors:
    # every rank takes the same decision, whether an element is inf (skip)
    # or only the sum of squares overflowed (apply).
    mp.spawn(_nonfinite_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"nonfinite{r}.pt", weights_only=True) for r in range(WORLD)]
    assert results[0] == results[1]
    got = results[0]
    assert got["inf"] == got["inf_clip"] == (0, 1, [0.0] * 4)
    iterations, skipped, weights = got["norm_overflows"]
    assert (iterations, skipped) == (1, 0)
    np.testing.assert_array_equal(weights, np.full(4, -1e20, np.float32))  # mean 2e20 / 2, lr 1


# -- no spawn -----------------------------------------------------------------------


def test_no_sync_is_a_null_context_for_a_plain_module():
    model = torch.nn.Linear(3, 1)
    opt = AccumOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), merge_grad=2)
    for _ in range(2):
        with opt.no_sync(model):
            model(torch.ones(1, 3)).sum().backward()
        opt.step()
    assert opt.iterations == 1
    assert opt.state_dict()["accum"]["window_steps"] == 0


def test_flush_and_save_refuse_a_window_left_unreduced_by_ddp_no_sync():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AccumOptimizer(torch.optim.SGD([p], lr=0.1), merge_grad=3)
    fake = _FakeDDP()
    with opt.no_sync(fake):
        p.sum().backward()
    opt.step()
    for call in (opt.flush, opt.state_dict):
        with pytest.raises(RuntimeError, match=r"no_sync.*\(DDP\).*outside `opt.no_sync`"):
            call()
    assert opt.window_steps == 1 and opt.iterations == 0 and torch.equal(p, torch.zeros(2))
    # A micro-step outside no_sync reduces the window so far: both work again.
    p.sum().backward()
    opt.step()
    assert opt.state_dict()["accum"]["window_steps"] == 2
    assert opt.flush() and opt.iterations == 1
    torch.testing.assert_close(p.detach(), torch.full((2,), -0.1))
