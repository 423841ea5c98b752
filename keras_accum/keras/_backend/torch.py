"""torch-backend plumbing: eager steps, in-place adds, no autograd.

Knows how Keras's torch backend runs the contract's steps, never what they
compute. Keras's torch trainer calls `optimizer.apply(grads, weights)` under
`torch.no_grad()` after zeroing `.grad` at every step, so the window lives in
the optimizer's own variables, never in `.grad`. Steps run eagerly: the host
knows the window position and runs exactly the step that is due; a branch
is a Python `if`. Under `torch.compile` (`model.compile(jit_compile=True)`)
the position is read from the state instead, so one compiled graph serves
every micro-step (the branch is a graph break). `jit_compile` on the
optimizer has no effect here.
"""

from __future__ import annotations

import torch

from keras_accum.keras import _backend as base


class Plumbing(base.Plumbing):
    def traced(self):
        return torch.compiler.is_compiling()

    def check_traced_raise(self):
        pass  # a graph break: the check runs eagerly

    def assert_finite(self, finite, micro_step):
        if not bool(finite):
            raise FloatingPointError(
                f"on_nonfinite='raise': non-finite gradient at micro-step {int(micro_step)}; "
                "nothing was accumulated."
            )

    def eager_step(self, run, closes, starts, grads, weight):
        with torch.no_grad():
            return run(grads, weight, closes=closes, starts=starts)

    def traced_step(self, run):
        with torch.no_grad():
            run()

    def eager_close(self, run):
        with torch.no_grad():
            run()

    def add_into(self, accumulator, gradient):
        accumulator.value.add_(gradient)

    def write_into(self, accumulator, gradient):
        accumulator.value.copy_(gradient)

    def clear(self, accumulator, done, index):
        # A fill in place: Keras's `assign` would copy a new zero tensor in.
        accumulator.value.zero_()

    def sum_of_squares(self, tensor):
        # One read and no temporary: `sum(square(t))` writes the squares out.
        return torch.linalg.vector_norm(tensor).square()

    def snapshot(self, variable):
        return variable.value.detach().clone()
