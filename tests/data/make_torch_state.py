"""Writes `tests/data/torch_format1_adamw_merge4_ema.pt` (see tests/data/README.md).

A mid-window `AccumOptimizer.state_dict()` of a small MLP with AdamW,
`merge_grad=4`, `use_ema=True`, in two modes: the window in side buffers
(`step(weight=...)`) and in `.grad` (the default). Next to each: the initial
weights, every micro-batch (inputs, targets, weight), the weights at the save
and the uninterrupted run's end state, so that a test can check a load of the
saved dict against the values stored with it and a resume against a replay.
Everything is tensors, numbers, strings, lists and dicts:
`torch.load(weights_only=True)` reads it.

Run from the repository root: `python tests/data/make_torch_state.py`.
"""

from __future__ import annotations

import copy

import torch

from keras_accum.torch import AccumOptimizer

OUT = "tests/data/torch_format1_adamw_merge4_ema.pt"
N_MICRO = 12  # three windows of 4
SAVE_AFTER = 6  # one update, then 2 micro-steps of an open window
WEIGHTS = [1.0, 2.0, 3.0, 0.5, 1.5, 4.0, 2.0, 1.0, 1.0, 2.0, 0.5, 3.0]


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def make_optimizer(model: torch.nn.Module) -> AccumOptimizer:
    inner = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    return AccumOptimizer(inner, merge_grad=4, use_ema=True, ema_momentum=0.9)


def batches() -> list:
    g = torch.Generator().manual_seed(1)
    return [
        {"x": torch.randn(5, 4, generator=g), "y": torch.randn(5, 2, generator=g), "weight": w}
        for w in WEIGHTS
    ]


def clone_params(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(weighted: bool, data: list) -> dict:
    model = build()
    init = clone_params(model)
    opt = make_optimizer(model)
    saved = None
    for k, b in enumerate(data):
        torch.nn.functional.mse_loss(model(b["x"]), b["y"]).backward()
        opt.step(weight=b["weight"] if weighted else None)
        opt.zero_grad()
        if k + 1 == SAVE_AFTER:
            # deepcopy: the dict is a snapshot of this moment.
            saved = {"model": clone_params(model), "opt": copy.deepcopy(opt.state_dict())}
    assert saved["opt"]["accum"]["window_steps"] == 2
    params = list(model.parameters())
    return {
        "weighted": weighted,
        "init": init,
        **saved,
        "final": {
            "model": clone_params(model),
            "ema": [opt.state[p]["ema"].clone() for p in params],
            "iterations": opt.iterations,
            "micro_steps": opt.micro_steps,
        },
    }


def main() -> None:
    data = batches()
    torch.save(
        {
            "torch_version": str(torch.__version__),
            "save_after": SAVE_AFTER,
            "batches": data,
            "weighted": run(True, data),
            "grad": run(False, data),
        },
        OUT,
    )


if __name__ == "__main__":
    main()
