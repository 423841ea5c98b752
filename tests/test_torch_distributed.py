"""DDP (two gloo processes) and torch.compile with AccumOptimizer.

DDP: `opt.no_sync(model)` skips the all-reduce on micro-steps that do not
update, and two processes give the weights of the single-process large batch
(docs/semantics.md, point 14). torch.compile: a compiled training step gives the eager
numbers and never recompiles between update and non-update micro-steps.
"""

from __future__ import annotations

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from keras_accum.torch import AccumOptimizer

# Process groups on 127.0.0.1: one at a time (see pyproject.toml).
pytestmark = pytest.mark.xdist_group("processes")

WORLD = 2
MERGE_GRAD = 3
MICRO_BATCH = 4
N_UPDATES = 3
LARGE_BATCH = WORLD * MERGE_GRAD * MICRO_BATCH


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def _data():
    g = torch.Generator().manual_seed(7)
    n = N_UPDATES * LARGE_BATCH
    return torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)


def _micro_slice(update: int, k: int, rank: int) -> slice:
    start = update * LARGE_BATCH + (k * WORLD + rank) * MICRO_BATCH
    return slice(start, start + MICRO_BATCH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out_path: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        all_reduces = [0]

        def counting_hook(state, bucket):
            all_reduces[0] += 1
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        opt = AccumOptimizer(
            torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), merge_grad=MERGE_GRAD
        )
        x, y = _data()
        for u in range(N_UPDATES):
            for k in range(MERGE_GRAD):
                s = _micro_slice(u, k, rank)
                with opt.no_sync(ddp):
                    torch.nn.functional.mse_loss(ddp(x[s]), y[s]).backward()
                opt.step()
                opt.zero_grad()
        if rank == 0:
            torch.save(
                {
                    "params": [p.detach() for p in ddp.module.parameters()],
                    "all_reduces": all_reduces[0],
                    "iterations": opt.iterations,
                },
                out_path,
            )
        dist.barrier()  # no rank tears down while the other still talks
    finally:
        # DDP must not be the group's last owner: see _ddp_bucket_view_worker
        # in test_torch_hardening.py.
        ddp = opt = None
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process_large_batch(tmp_path):
    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(_free_port(), out_path), nprocs=WORLD, join=True)
    result = torch.load(out_path, weights_only=True)

    model = _model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    for u in range(N_UPDATES):
        s = slice(u * LARGE_BATCH, (u + 1) * LARGE_BATCH)
        torch.nn.functional.mse_loss(model(x[s]), y[s]).backward()
        plain.step()
        plain.zero_grad()

    assert result["iterations"] == N_UPDATES
    # One all-reduce (one bucket) per update: no_sync skipped the others.
    assert result["all_reduces"] == N_UPDATES
    for got, want in zip(result["params"], model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


class _FakeDDP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.entered = 0

    def no_sync(self):
        module = self

        class _Ctx:
            def __enter__(self):
                module.entered += 1

            def __exit__(self, *exc):
                return False

        return _Ctx()


def test_no_sync_only_on_non_update_micro_steps():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AccumOptimizer(torch.optim.SGD([p], lr=0.1), merge_grad=3)
    fake = _FakeDDP()
    for _ in range(6):
        with opt.no_sync(fake):
            p.sum().backward()
        opt.step()
        opt.zero_grad()
    assert fake.entered == 4 and opt.iterations == 2
    # Side buffers (an accumulator dtype other than the parameter's): every
    # micro-step must all-reduce, so no_sync is a null context.
    buffered = AccumOptimizer(
        torch.optim.SGD([p], lr=0.1), merge_grad=3, accumulator_dtype="float64"
    )
    with buffered.no_sync(fake):
        pass
    assert fake.entered == 4


# -- torch.compile ------------------------------------------------------------------


def _train(compiled: bool):
    model = _model()
    opt = AccumOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.01), merge_grad=3, use_ema=True, clipnorm=1.0
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def train_step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        return loss

    # aot_eager runs dynamo and AOTAutograd (the parts that guard and
    # recompile) without inductor's C++ build, which takes ~25 s on CPU.
    step = torch.compile(train_step, backend="aot_eager") if compiled else train_step
    x, y = _data()
    losses = []
    for i in range(8):
        s = slice(4 * i, 4 * i + 4)
        losses.append(step(x[s], y[s]).detach())
        if i == 0 and compiled:
            # From the second call on, any recompile raises.
            torch._dynamo.config.error_on_recompile = True
    return model, opt, losses


def test_compiled_step_matches_eager_and_never_recompiles():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        model, opt, losses = _train(compiled=True)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    ref_model, ref_opt, ref_losses = _train(compiled=False)
    assert opt.iterations == ref_opt.iterations == 2 and opt.micro_steps == 8
    assert graphs >= 1  # the forward really was compiled
    for a, b in zip(losses, ref_losses):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(opt.state[a]["ema"], ref_opt.state[b]["ema"])
