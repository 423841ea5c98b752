"""FSDP2 (`fully_shard` on a CPU device mesh, two gloo processes) with AccumOptimizer.

`opt.no_sync(model)` switches FSDP2's gradient sync off on micro-steps that do
not update, so the reduce-scatter runs once per window; the result, with
clipping by the global norm across shards and an EMA of the sharded
parameters, equals the single-process large-batch run computed here with
plain torch (SGD, `clip_grad_norm_`, and the EMA formula of the contract).
A mid-window save (per-rank `state_dict()`) resumes to the same weights when
the micro-step before the save runs outside `no_sync` (README recipe).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_torch_distributed import (
    MERGE_GRAD,
    N_UPDATES,
    WORLD,
    _data,
    _free_port,
    _micro_slice,
    _model,
)

from keras_accum.torch import AccumOptimizer

CLIP = 0.05  # below the merged gradients' norms here: the clip acts
MOMENTUM_EMA = 0.9
LR = 0.1


def _sharded_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _optimizer(model):
    return AccumOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
        merge_grad=MERGE_GRAD,
        global_clipnorm=CLIP,
        use_ema=True,
        ema_momentum=MOMENTUM_EMA,
    )


def _run(model, opt, rank, micro_steps, sync_before=None):
    """The README's FSDP2 loop over the given (update, k) micro-steps."""
    x, y = _data()
    for u, k in micro_steps:
        s = _micro_slice(u, k, rank)
        if sync_before is not None and (u, k) == sync_before:
            torch.nn.functional.mse_loss(model(x[s]), y[s]).backward()  # syncs: about to save
        else:
            with opt.no_sync(model):
                torch.nn.functional.mse_loss(model(x[s]), y[s]).backward()
        opt.step()
        opt.zero_grad()


def _full(tensors):
    return [t.full_tensor().detach().clone() for t in tensors]


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        reduces = [0]
        original = _fsdp_param_group.foreach_reduce

        def counting(*args, **kwargs):
            reduces[0] += 1
            return original(*args, **kwargs)

        _fsdp_param_group.foreach_reduce = counting
        all_steps = [(u, k) for u in range(N_UPDATES) for k in range(MERGE_GRAD)]
        model = _sharded_model(mesh)
        opt = _optimizer(model)
        _run(model, opt, rank, all_steps)
        result = {
            "params": _full(model.parameters()),
            "ema": _full(opt.state[p]["ema"] for p in model.parameters()),
            "reduces": reduces[0],
            "iterations": opt.iterations,
        }
        # Mid-window save and resume: stop after 4 micro-steps (window 1 open).
        part = _sharded_model(mesh)
        part_opt = _optimizer(part)
        _run(part, part_opt, rank, all_steps[:4], sync_before=all_steps[3])
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save({"model": part.state_dict(), "opt": part_opt.state_dict()}, path)
        resumed = _sharded_model(mesh)
        resumed_opt = _optimizer(resumed)
        saved = torch.load(path, weights_only=False)  # DTensors
        resumed.load_state_dict(saved["model"])
        resumed_opt.load_state_dict(saved["opt"])
        _run(resumed, resumed_opt, rank, all_steps[4:])
        result["resumed"] = _full(resumed.parameters())
        result["resumed_iterations"] = resumed_opt.iterations
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _large_batch_reference():
    """One process, batches of WORLD * MERGE_GRAD * MICRO_BATCH, plain torch."""
    model = _model()
    plain = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    ema = None
    x, y = _data()
    large = WORLD * MERGE_GRAD * (x.shape[0] // (N_UPDATES * WORLD * MERGE_GRAD))
    for u in range(N_UPDATES):
        s = slice(u * large, (u + 1) * large)
        torch.nn.functional.mse_loss(model(x[s]), y[s]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        plain.step()
        plain.zero_grad()
        params = [p.detach().clone() for p in model.parameters()]
        ema = params if ema is None else [
            MOMENTUM_EMA * e + (1 - MOMENTUM_EMA) * p for e, p in zip(ema, params)
        ]
    return [p.detach() for p in model.parameters()], ema


@pytest.mark.slow
def test_fsdp2_two_processes_equal_single_process_large_batch(tmp_path):
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    params, ema = _large_batch_reference()
    assert result["iterations"] == N_UPDATES
    for got, want in zip(result["params"], params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(result["ema"], ema):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Three FSDP groups (two layers and the root, which holds no parameter of
    # its own): one reduce per group that has gradients, once per window.
    assert result["reduces"] % N_UPDATES == 0 and 0 < result["reduces"] // N_UPDATES <= 3
    # Resumed mid-window: the same weights as the uninterrupted run.
    assert result["resumed_iterations"] == N_UPDATES
    for got, want in zip(result["resumed"], result["params"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
