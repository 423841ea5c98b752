"""The case table that drives the generic tests, free of any framework.

Each row of `CASES` is one configuration of the accumulating optimizer and
one gradient stream shape; adding a case is one line. `make_stream` turns a
row into the micro-step gradients (NumPy, float32) that both the oracle in
`reference.py` and the implementation under test consume, and `make_params`
gives the starting variables.

`NONFINITE_CASES` puts one inf or NaN at each position of a window, under each
`on_nonfinite` policy; `nonfinite_stream` builds its stream.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

#: Variable shapes: a tiny dense kernel, its bias and an extra vector.
SHAPES = [(3, 2), (2,), (4,)]


@dataclasses.dataclass(frozen=True)
class AccumCase:
    """One row of the case table.

    Attributes:
        id: str, the pytest id.
        merge_grad: int, micro-steps per window.
        n_micro: int, micro-steps to run.
        reduction: "mean" or "sum".
        weights: tuple of floats (one per micro-step) or None for all 1.0.
        none_at: tuple of `(micro_step_index, param_index)` pairs (0-based)
            whose gradient is None.
        flush_at_end: bool, call `flush()` after the last micro-step.
        config: tuple of `(key, value)` pairs, extra constructor kwargs.
    """

    id: str
    merge_grad: int
    n_micro: int
    reduction: str = "mean"
    weights: tuple | None = None
    none_at: tuple = ()
    flush_at_end: bool = False
    config: tuple = ()

    def __post_init__(self):
        # A typo in the table should fail loudly, not test something else.
        if self.weights is not None and len(self.weights) != self.n_micro:
            raise ValueError(f"{self.id}: {len(self.weights)} weights for {self.n_micro} steps")
        for k, i in self.none_at:
            if not (0 <= k < self.n_micro and 0 <= i < len(SHAPES)):
                raise ValueError(f"{self.id}: none_at entry {(k, i)} out of range")

    @property
    def kwargs(self) -> dict:
        """Constructor kwargs: merge_grad, reduction and the extra config."""
        return {"merge_grad": self.merge_grad, "reduction": self.reduction, **dict(self.config)}

    @property
    def n_updates(self) -> int:
        """Windows closed, counting a final flush of a partial window."""
        full, rest = divmod(self.n_micro, self.merge_grad)
        return full + (1 if self.flush_at_end and rest else 0)


_W8 = (1.0, 2.0, 3.0, 0.5, 1.5, 4.0, 2.0, 1.0)

CASES = [
    AccumCase("merge1", merge_grad=1, n_micro=3),
    AccumCase("merge2", merge_grad=2, n_micro=6),
    AccumCase("merge4", merge_grad=4, n_micro=12),
    AccumCase("merge4_sum", merge_grad=4, n_micro=8, reduction="sum"),
    AccumCase("merge4_weighted", merge_grad=4, n_micro=8, weights=_W8),
    AccumCase("merge4_weighted_sum", merge_grad=4, n_micro=8, reduction="sum", weights=_W8),
    # Variable 1 has no gradient in the micro-step that closes window 1 but
    # had one earlier: its accumulated gradient must still be applied.
    AccumCase("merge4_none_in_closing_step", merge_grad=4, n_micro=8, none_at=((3, 1),)),
    # Variable 2 has no gradient in all of window 2: not updated then (its
    # inner state, e.g. a momentum buffer built in window 1, must not move).
    AccumCase(
        "merge4_none_whole_window",
        merge_grad=4,
        n_micro=12,
        none_at=((4, 2), (5, 2), (6, 2), (7, 2), (9, 0)),
    ),
    # Gradients absent at a window's first micro-step (which writes into the
    # accumulators rather than adding) and present later in it: the
    # accumulators must hold only this window's sum, never the last one's.
    AccumCase(
        "merge4_none_in_opening_step",
        merge_grad=4,
        n_micro=12,
        none_at=((4, 1), (8, 0), (8, 2)),
        weights=_W8 + (1.0, 2.0, 0.5, 3.0),
    ),
    AccumCase("merge4_flush_open_window", merge_grad=4, n_micro=7, flush_at_end=True),
    AccumCase(
        "merge4_weighted_flush",
        merge_grad=4,
        n_micro=6,
        weights=_W8[:6],
        flush_at_end=True,
    ),
    AccumCase("ema_merge1", merge_grad=1, n_micro=5, config=(("use_ema", True),)),
    AccumCase(
        "ema_merge1_warmup_overwrite2",
        merge_grad=1,
        n_micro=6,
        config=(("use_ema", True), ("ema_warmup", True), ("ema_overwrite_frequency", 2)),
    ),
    AccumCase(
        "ema_merge4",
        merge_grad=4,
        n_micro=12,
        config=(("use_ema", True), ("ema_momentum", 0.5)),
    ),
    AccumCase(
        "ema_merge4_warmup_overwrite2",
        merge_grad=4,
        n_micro=16,
        config=(("use_ema", True), ("ema_warmup", True), ("ema_overwrite_frequency", 2)),
    ),
    AccumCase("clipvalue", merge_grad=2, n_micro=6, config=(("clipvalue", 0.5),)),
    AccumCase("clipnorm", merge_grad=2, n_micro=6, config=(("clipnorm", 0.5),)),
    AccumCase("global_clipnorm", merge_grad=2, n_micro=6, config=(("global_clipnorm", 1.0),)),
    AccumCase(
        "clipvalue_global_clipnorm",
        merge_grad=2,
        n_micro=6,
        config=(("clipvalue", 0.5), ("global_clipnorm", 0.8)),
    ),
    # Window weights that are no power of two (6.5, 8.5; then 3 and a flushed
    # 2), and below 1 (0.75, 0.375): the divide and the norm clipping's
    # multiply in every order an implementation may fuse them.
    AccumCase(
        "global_clipnorm_weighted",
        merge_grad=4,
        n_micro=8,
        weights=_W8,
        config=(("global_clipnorm", 2.0),),
    ),
    AccumCase(
        "clipnorm_merge3_flush",
        merge_grad=3,
        n_micro=5,
        flush_at_end=True,
        config=(("clipnorm", 1.0),),
    ),
    AccumCase(
        "global_clipnorm_light_weights",
        merge_grad=2,
        n_micro=4,
        weights=(0.25, 0.5, 0.125, 0.25),
        config=(("global_clipnorm", 2.0),),
    ),
]


@dataclasses.dataclass(frozen=True)
class NonfiniteCase:
    """One inf/NaN in param 0's gradient at `position` of the first window.

    Attributes:
        id: str, the pytest id.
        position: int, 0-based micro-step of the first window holding `value`.
        value: float, inf or nan.
        on_nonfinite: "skip", "raise" or "ignore".
        merge_grad: int, micro-steps per window.
        n_windows: int, windows in the stream.
    """

    id: str
    position: int
    value: float
    on_nonfinite: str
    merge_grad: int = 4
    n_windows: int = 2

    @property
    def kwargs(self) -> dict:
        """Constructor kwargs: merge_grad and on_nonfinite."""
        return {"merge_grad": self.merge_grad, "on_nonfinite": self.on_nonfinite}

    def stream(self, seed: int = 0) -> list:
        """The case's micro-step stream (see `nonfinite_stream`)."""
        return nonfinite_stream(self.position, self.value, self.merge_grad, self.n_windows, seed)


NONFINITE_CASES = [
    NonfiniteCase(
        f"{policy}_{'inf' if math.isinf(value) else 'nan'}_pos{position}",
        position=position,
        value=value,
        on_nonfinite=policy,
    )
    for policy in ("skip", "ignore", "raise")
    for value in (math.inf, math.nan)
    for position in range(4)
]


def _rng(seed: int, purpose: int) -> np.random.Generator:
    # Separate streams for params and gradients, so that the same seed never
    # makes a gradient equal to a weight.
    return np.random.default_rng([seed, purpose])


def make_params(seed: int = 0, shapes=SHAPES) -> list:
    """Starting variables: float32 standard normals, one array per shape."""
    rng = _rng(seed, 0)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def make_stream(case: AccumCase, seed: int = 0, shapes=SHAPES) -> list:
    """The micro-step stream of a case: a list of `(grads, weight)` pairs.

    Gradients are float32 standard normals (drawn for every entry, so adding a
    None to a case leaves the other numbers as they were), with the case's
    `none_at` entries replaced by None; weights are the case's or 1.0.
    """
    rng = _rng(seed, 1)
    none_at = set(case.none_at)
    stream = []
    for k in range(case.n_micro):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        grads = [None if (k, i) in none_at else g for i, g in enumerate(grads)]
        weight = 1.0 if case.weights is None else float(case.weights[k])
        stream.append((grads, weight))
    return stream


def nonfinite_stream(
    position: int, value: float, merge_grad: int = 4, n_windows: int = 2, seed: int = 0
) -> list:
    """A stream of `n_windows` full windows with one non-finite element.

    Element `[0, 0]` (the first) of param 0's gradient at micro-step
    `position` of the FIRST window is set to `value`; every other number is
    finite and equals `make_stream`'s for the same seed.
    """
    if not 0 <= position < merge_grad:
        raise ValueError(f"`position` must be in [0, {merge_grad}). Received: {position}")
    case = AccumCase("nonfinite", merge_grad=merge_grad, n_micro=merge_grad * n_windows)
    stream = make_stream(case, seed=seed)
    grads, _ = stream[position]
    grads[0].flat[0] = value
    return stream
