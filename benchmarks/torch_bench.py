"""torch section: AccumOptimizer(AdamW) against the hand-written accumulation loop.

Run by `python -m benchmarks` in its own process; alone:
`python -m benchmarks.torch_bench [--quick] [--sizes 1M,10M] --json out.json`.

The hand-written loop is what users write without us, with the same inner
`AdamW(foreach=True)`:

    loss = loss_fn(model(x), y) / k
    loss.backward()
    if (i + 1) % k == 0:
        clip_grad_norm_(params, c, foreach=True)   # when the wrapper clips
        inner.step()
        inner.zero_grad()

Measured on an MLP of the given size (batches of 8, forward and backward
included), and on the optimizer alone (fixed gradients, only `step()` and
`zero_grad()` timed). The EMA is timed against a bare `torch._foreach_lerp_`
of the same parameters into float32 copies. Configurations are interleaved
window by window; each figure is the median over windows.
"""

from __future__ import annotations

import gc
import time

import torch

from benchmarks import _common as C
from keras_accum.torch import AccumOptimizer

K = C.MERGE_GRAD
LR = 1e-4
CLIP = 1.0


def _mlp(width):
    torch.manual_seed(0)
    layers = []
    for i in range(C.LAYERS):
        layers.append(torch.nn.Linear(width, width))
        if i < C.LAYERS - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, foreach=True)


def _held_bytes(params, *optimizers):
    """Bytes of the distinct storages held by `.grad` and the optimizers' state."""
    storages = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()

    for p in params:
        add(p.grad)
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                add(value)
    return sum(storages.values())


class _Hand:
    """The hand-written loop, one micro-step per call."""

    def __init__(self, params, clip):
        self.params, self.clip = params, clip
        self.inner = _adamw(params)
        self.i = 0

    def optimizers(self):
        return (self.inner,)

    def backward(self, loss):
        (loss / K).backward()

    def step(self):
        self.i += 1
        if self.i % K == 0:
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.params, CLIP, foreach=True)
            self.inner.step()
            self.inner.zero_grad()


class _Ours:
    def __init__(self, params, **kwargs):
        self.opt = AccumOptimizer(_adamw(params), merge_grad=K, **kwargs)

    def optimizers(self):
        return (self.opt, self.opt.inner_optimizer)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()


def _configs(params):
    return {
        "hand": _Hand(params, clip=False),
        "accum": _Ours(params),
        "hand_clip": _Hand(params, clip=True),
        "accum_clip": _Ours(params, global_clipnorm=CLIP),
        "accum_ema": _Ours(params, use_ema=True),
    }


def _training(width, repeats):
    """Forward, backward and step per micro-step; memory held mid-window and after it."""
    model = _mlp(width)
    params = list(model.parameters())
    x = torch.randn(C.BATCH, width, generator=torch.Generator().manual_seed(1))
    y = torch.randn(C.BATCH, width, generator=torch.Generator().manual_seed(2))
    loss_fn = torch.nn.MSELoss()
    configs = _configs(params)

    def micro_step(cfg):
        cfg.backward(loss_fn(model(x), y))
        cfg.step()

    for cfg in configs.values():  # first window: AdamW state, EMA copies
        for _ in range(K):
            micro_step(cfg)
    per_repeat = {name: [] for name in configs}
    for name in C.interleaved(configs, repeats):
        cfg = configs[name]
        times = [C.timed(lambda cfg=cfg: micro_step(cfg)) for _ in range(K)]
        per_repeat[name].append(C.window_stats(times))
    rows = [
        dict(context="training (forward, backward, step)", row=n, **C.median_stats(r))
        for n, r in per_repeat.items()
    ]

    # Memory: what .grad and the optimizers hold, at the fullest point of a
    # window (after its last backward, before the update) and after it.
    memory = []
    held = {}
    for name, cfg in configs.items():
        peak = 0
        for i in range(K):
            cfg.backward(loss_fn(model(x), y))
            if i == K - 1:
                peak = max(peak, _held_bytes(params, *cfg.optimizers()))
            cfg.step()
            peak = max(peak, _held_bytes(params, *cfg.optimizers()))
        held[name] = peak
    trainable = sum(p.numel() * p.element_size() for p in params)
    for name in ("accum", "accum_clip", "accum_ema"):
        base = "hand_clip" if name == "accum_clip" else "hand"
        memory.append(dict(row=name, extra=held[name] - held[base], trainable=trainable))
    del configs
    gc.collect()
    return rows, memory


def _optimizer_only(width, repeats):
    """`step()` and `zero_grad()` alone on fixed gradients (set, untimed, before each window)."""
    model = _mlp(width)
    params = list(model.parameters())
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    configs = _configs(params)

    def set_grads():
        for p, g in zip(params, grads):
            p.grad = g.clone()

    def window(cfg):
        set_grads()
        return [C.timed(cfg.step) for _ in range(K)]

    for cfg in configs.values():
        window(cfg)
    per_repeat = {name: [] for name in configs}
    for name in C.interleaved(configs, repeats):
        per_repeat[name].append(C.window_stats(window(configs[name])))
    rows = [
        dict(context="optimizer alone (step, zero_grad)", row=n, **C.median_stats(r))
        for n, r in per_repeat.items()
    ]

    # The EMA update alone, against a bare foreach lerp of the same shadows:
    # the same tensors, so that the ratio is the wrapper's cost, not where
    # the allocator put two sets of copies (the same lerp ran 0 to 13%
    # faster on our shadows than on fresh clones at 1M, process to process).
    ours = configs["accum_ema"].opt
    emas = [ours.state[p]["ema"] for p in params]
    detached = [p.detach() for p in params]

    def bare():
        torch._foreach_lerp_(emas, detached, 0.01)

    def ours_ema():
        ours._update_ema(params)

    per_repeat = {"accum_ema_update": [], "bare_lerp": []}
    # Both under one `no_grad`, as `step()` runs the EMA update (entering it
    # per call would time the context manager, not the update).
    with torch.no_grad():
        for fn in (ours_ema, bare):
            fn()
        calls = {"accum_ema_update": ours_ema, "bare_lerp": bare}
        for name in C.interleaved(calls, repeats * K):
            per_repeat[name].append(C.uniform_stats([C.timed(calls[name])], "update"))
    rows += [
        dict(context="EMA update alone", row=n, **C.median_stats(r)) for n, r in per_repeat.items()
    ]
    del configs
    gc.collect()
    return rows


def main(argv=None):
    parser = C.section_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = C.QUICK_WIDTHS if args.quick else C.FULL_WIDTHS
    sizes = args.sizes.split(",") if args.sizes else list(widths)
    rows, memory = [], []
    for size in sizes:
        width = widths[size]
        repeats = C.QUICK_REPEATS if args.quick else C.FULL_REPEATS[size]
        start = time.perf_counter()
        train_rows, mem = _training(width, repeats)
        alone_rows = _optimizer_only(width, repeats)
        for r in train_rows + alone_rows + mem:
            r.update(size=size, params=C.n_params(width))
        rows += train_rows + alone_rows
        memory += mem
        print(f"torch {size}: {time.perf_counter() - start:.1f} s", flush=True)
    C.write_json(
        args.json,
        {"rows": rows, "memory": memory, "merge_grad": K, "threads": torch.get_num_threads()},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
