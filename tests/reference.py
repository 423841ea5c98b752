"""NumPy reference implementation of the keras_accum contract: the test oracle.

Written from ``docs/semantics.md``, including the choices it records where the contract
is silent, never from the Keras or torch code under test, and importing neither
framework nor ``keras_accum`` (the implementation under test is
never its own oracle). Everything is float32 and a plain per-tensor Python loop,
so that each line can be checked against the formula in its docstring.

Pieces:
    RefSGD: SGD with momentum/Nesterov, in torch's form.
    RefAdam: Adam in Keras 3's exact form.
    RecordingInner: an inner optimizer that only records what it is handed.
    RefAccum: the accumulating wrapper (merge, clip, skip, EMA, flush).
    merge_stream: the merged gradients of a stream, without any optimizer.
    ema_momentum_at: the EMA momentum used at an update.
"""

from __future__ import annotations

import math

import numpy as np

_F32 = np.float32
_REDUCTIONS = ("mean", "sum")
_NONFINITE_POLICIES = ("skip", "raise", "ignore")


def _f32(x) -> np.ndarray:
    """A float32 copy of `x` (never a view: the caller may change `x` later)."""
    return np.array(x, dtype=_F32, copy=True)


def _copy_list(grads: list) -> list:
    return [None if g is None else np.array(g, copy=True) for g in grads]


class RefSGD:
    """SGD with optional (Nesterov) momentum, in torch's form, float32.

    For each parameter `w` with gradient `g` (dampening 0, no weight decay)::

        b  = momentum * b + g          # b starts at zeros, so b_1 = g
        g' = g + momentum * b          # nesterov=True
        g' = b                         # nesterov=False
        w  = w - lr * g'

    With `momentum=0` this is `w = w - lr * g`. torch initialises its buffer to
    a clone of `g` on the first step; `momentum * 0 + g == g` exactly, so a
    zeros-initialised buffer gives the same numbers.

    Keras's SGD writes the same rule as `m = mu * m - lr * g; w = w + m`
    (Nesterov: `w = w + mu * m - lr * g`). For a constant learning rate
    `m == -lr * b`, so both forms agree up to float32 rounding (not bitwise).

    A parameter whose gradient is None is left untouched, and so is its
    momentum buffer (torch skips parameters whose `.grad` is None).

    Args:
        lr: float, the learning rate.
        momentum: float, the momentum `mu`. Defaults to 0.0.
        nesterov: bool, whether to use Nesterov momentum. Defaults to False.

    Example:
        >>> params = [np.ones(2, np.float32)]
        >>> RefSGD(0.1).step(params, [np.ones(2, np.float32)])
        >>> params[0]
        array([0.9, 0.9], dtype=float32)
    """

    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False):
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        #: Momentum buffers by parameter index, created (as zeros) on the
        #: parameter's first non-None gradient.
        self.momentum_buffers: dict[int, np.ndarray] = {}
        #: Number of calls to `step`.
        self.steps = 0

    def step(self, params: list, grads: list) -> None:
        """Updates `params` in place with `grads` (None entries are skipped)."""
        self.steps += 1
        lr = _F32(self.lr)
        mu = _F32(self.momentum)
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = np.asarray(g, dtype=_F32)
            p = params[i]
            if self.momentum == 0.0:
                p -= lr * g
                continue
            b = self.momentum_buffers.get(i)
            if b is None:
                b = np.zeros_like(g)
            b = mu * b + g
            self.momentum_buffers[i] = b
            direction = g + mu * b if self.nesterov else b
            p -= lr * direction


class RefAdam:
    """Adam in Keras 3's exact form (`keras.optimizers.Adam`, amsgrad off), float32.

    One step counter for the whole optimizer, `t = iterations + 1`, that
    advances once per `step` call, even for parameters whose gradient is None
    (Keras filters None gradients out but still increments `iterations` once
    per `apply_gradients`). For each parameter with gradient `g`::

        alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)
        m = m + (g - m) * (1 - beta_1)
        v = v + (g**2 - v) * (1 - beta_2)
        w = w - (m * alpha) / (sqrt(v) + epsilon)

    `m` and `v` start at zeros. A None gradient leaves `w`, `m` and `v`
    untouched. Note the epsilon is outside the bias correction (Keras's form),
    which differs slightly from torch's `Adam` (`eps` added to `sqrt(v_hat)`).

    Args:
        lr: float, the learning rate.
        beta_1: float, first-moment decay. Defaults to 0.9.
        beta_2: float, second-moment decay. Defaults to 0.999.
        epsilon: float, added to `sqrt(v)`. Defaults to 1e-7 (Keras's default).

    Example:
        >>> params = [np.ones(1, np.float32)]
        >>> RefAdam(0.1).step(params, [np.ones(1, np.float32)])
        >>> float(params[0][0])  # about 1 - lr on the first step
        0.9...
    """

    def __init__(
        self, lr: float, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7
    ):
        self.lr = float(lr)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        #: Number of steps taken (Keras's `iterations` of the inner optimizer).
        self.iterations = 0
        self.m: dict[int, np.ndarray] = {}
        self.v: dict[int, np.ndarray] = {}

    def step(self, params: list, grads: list) -> None:
        """Updates `params` in place with `grads` (None entries are skipped)."""
        t = _F32(self.iterations + 1)
        lr = _F32(self.lr)
        b1 = _F32(self.beta_1)
        b2 = _F32(self.beta_2)
        eps = _F32(self.epsilon)
        b1_power = np.power(b1, t)
        b2_power = np.power(b2, t)
        alpha = lr * np.sqrt(_F32(1) - b2_power) / (_F32(1) - b1_power)
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = np.asarray(g, dtype=_F32)
            m = self.m.get(i, np.zeros_like(g))
            v = self.v.get(i, np.zeros_like(g))
            m = m + (g - m) * (_F32(1) - b1)
            v = v + (np.square(g) - v) * (_F32(1) - b2)
            self.m[i] = m
            self.v[i] = v
            params[i] -= (m * alpha) / (np.sqrt(v) + eps)
        self.iterations += 1


class RecordingInner:
    """An inner optimizer that changes nothing and records what it is handed.

    Used to replay the gradients `RefAccum` hands on through a real Keras or
    torch optimizer, and to test the merge without any update rule.

    Attributes:
        calls: list, one entry per `step` call: the handed gradient list
            (copies; None for a variable without gradient).
    """

    def __init__(self):
        self.calls: list[list] = []

    def step(self, params: list, grads: list) -> None:
        """Records a copy of `grads`; `params` are left as they are."""
        del params  # Recording only.
        self.calls.append(_copy_list(grads))


def ema_momentum_at(updates_before: int, ema_momentum: float, ema_warmup: bool) -> float:
    """The EMA momentum `m` used at an update (docs/semantics.md, point 9).

    Formula, with `n = updates_before` (updates applied before this one)::

        m = 0                                          if n == 0 (ema = w)
        m = min(ema_momentum, (1 + n) / (10 + n))      if ema_warmup
        m = ema_momentum                               otherwise

    Args:
        updates_before: int, updates applied before this one.
        ema_momentum: float in [0, 1].
        ema_warmup: bool.

    Returns:
        float, the momentum.
    """
    if updates_before == 0:
        return 0.0
    if ema_warmup:
        return min(ema_momentum, (1.0 + updates_before) / (10.0 + updates_before))
    return ema_momentum


def _all_finite(arrays) -> bool:
    return all(bool(np.all(np.isfinite(a))) for a in arrays if a is not None)


class RefAccum:
    """The accumulating optimizer wrapper of the contract, in NumPy.

    Micro-step `step(grads, weight=w)`, for each variable `i` with a gradient::

        acc_i = acc_i + float32(w) * float32(g_i)      # acc_i starts at zeros
        seen_i = True
        window_steps += 1; window_weight += w; micro_steps += 1

    When `window_steps == merge_grad` (or on `flush()` with an open window) the
    window closes. A window whose weights sum to 0 holds no samples: it goes
    straight to 8 (nothing applied, not an update, not a skip; a large batch
    of no samples takes no step). Otherwise:

    1. `merged_i = acc_i / window_weight` ("mean") or `acc_i` ("sum"), for
       seen variables; None for variables never seen in the window.
    2. `last_grad_norm = sqrt(sum_i sum(merged_i**2))` over seen variables,
       before clipping.
    3. `on_nonfinite="skip"` and a non-finite `merged_i`: `skipped_updates += 1`
       and go to 8 (params, inner state, EMA and `iterations` do not move).
    4. `clipvalue`: `g = clip(g, -clipvalue, clipvalue)`; then `clipnorm`:
       `g = g * clipnorm / max(||g||, clipnorm)` per variable, or
       `global_clipnorm`: `g = g * c / max(sqrt(sum_i ||g_i||**2), c)`.
    5. `inner.step(params, merged)` (None for unseen variables); the list is
       recorded in `handed`.
    6. `iterations += 1`.
    7. EMA (`use_ema`): with `n = iterations - 1` and `m = ema_momentum_at(n)`,
       `ema_i = m * ema_i + (1 - m) * w_i` for every variable (seen or not).
       If `ema_overwrite_frequency=f` and `iterations % f == 0`: `w_i = ema_i`.
    8. Reset: `acc_i = 0` (assignment), `seen_i = False`, `window_steps = 0`,
       `window_weight = 0`.

    With `on_nonfinite="raise"`, a micro-step whose `g_i` or `w * g_i` has an
    inf/NaN raises `FloatingPointError("... micro-step N ...")`, N the 1-based
    index of that micro-step, before any state changes. With "ignore" nothing
    is checked and inf/NaN reach the inner optimizer.

    Args:
        params: list of arrays, the model variables (copied to float32; the
            list `self.params` is updated in place).
        inner: object with `step(params, grads)`, the inner optimizer.
        merge_grad: int >= 1, micro-steps per window. Defaults to 1.
        reduction: "mean" or "sum". Defaults to "mean".
        use_ema: bool, keep an EMA of the weights. Defaults to False.
        ema_momentum: float, the EMA momentum. Defaults to 0.99.
        ema_warmup: bool, use `min(ema_momentum, (1 + n) / (10 + n))`.
        ema_overwrite_frequency: int or None, copy the EMA into the weights
            after every f-th update.
        clipnorm: float or None, per-variable norm clip.
        clipvalue: float or None, element-wise value clip.
        global_clipnorm: float or None, global norm clip.
        on_nonfinite: "skip", "raise" or "ignore". Defaults to "skip".

    Raises:
        ValueError: a bad `merge_grad`, `reduction`, `on_nonfinite`, or both
            `clipnorm` and `global_clipnorm`.

    Example:
        >>> acc = RefAccum([np.ones(1)], RefSGD(0.1), merge_grad=2)
        >>> acc.step([np.array([1.0])]), acc.step([np.array([3.0])])
        (False, True)
        >>> acc.params[0]  # 1 - 0.1 * (1 + 3) / 2
        array([0.8], dtype=float32)
    """

    def __init__(
        self,
        params: list,
        inner,
        *,
        merge_grad: int = 1,
        reduction: str = "mean",
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_warmup: bool = False,
        ema_overwrite_frequency: int | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        on_nonfinite: str = "skip",
    ):
        if int(merge_grad) != merge_grad or merge_grad < 1:
            raise ValueError(f"`merge_grad` must be an int >= 1. Received: {merge_grad!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"`reduction` must be 'mean' or 'sum'. Received: {reduction!r}")
        if on_nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"Bad `on_nonfinite`. Received: {on_nonfinite!r}")
        if clipnorm is not None and global_clipnorm is not None:
            raise ValueError("Only one of `clipnorm` and `global_clipnorm` can be set.")
        self.params = [_f32(p) for p in params]
        self.inner = inner
        self.merge_grad = int(merge_grad)
        self.reduction = reduction
        self.use_ema = bool(use_ema)
        self.ema_momentum = float(ema_momentum)
        self.ema_warmup = bool(ema_warmup)
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.on_nonfinite = on_nonfinite

        self.accumulators = [np.zeros_like(p) for p in self.params]
        self.seen = [False] * len(self.params)
        self.ema = [_f32(p) for p in self.params] if self.use_ema else None
        self.iterations = 0
        self.micro_steps = 0
        self.skipped_updates = 0
        self.last_grad_norm: np.float32 | None = None
        self.window_steps = 0
        self.window_weight = _F32(0)
        #: The (clipped) gradient list handed to `inner.step`, one per update.
        self.handed: list[list] = []

    # -- micro-steps --------------------------------------------------------

    def step(self, grads: list, weight: float = 1.0) -> bool:
        """Takes one micro-step.

        Args:
            grads: list, one np.ndarray (or None) per variable.
            weight: float >= 0, this micro-step's weight `w`. Defaults to 1.0.

        Returns:
            bool, True when this micro-step closed a window (applied or skipped).

        Raises:
            ValueError: `grads` has the wrong length, or a bad `weight`.
            FloatingPointError: `on_nonfinite="raise"` and a non-finite
                gradient (or `w * g`); no state has changed.
        """
        if len(grads) != len(self.params):
            raise ValueError(
                f"`grads` must have one entry per variable. Received: "
                f"len(grads)={len(grads)} for {len(self.params)} variables"
            )
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"`weight` must be a finite number >= 0. Received: {weight!r}")
        w = _F32(weight)
        with np.errstate(over="ignore", invalid="ignore"):  # inf/nan are handled below
            products = [None if g is None else w * np.asarray(g, dtype=_F32) for g in grads]
        if self.on_nonfinite == "raise":
            raw = [None if g is None else np.asarray(g, dtype=_F32) for g in grads]
            if not (_all_finite(raw) and _all_finite(products)):
                bad = [
                    i
                    for i, (g, p) in enumerate(zip(raw, products, strict=True))
                    if g is not None and not (_all_finite([g]) and _all_finite([p]))
                ]
                raise FloatingPointError(
                    f"Non-finite gradient at micro-step {self.micro_steps + 1} "
                    f"(variable index {bad[0]}) with on_nonfinite='raise'."
                )

        self.micro_steps += 1
        self.window_steps += 1
        self.window_weight = _F32(self.window_weight + w)
        for i, wg in enumerate(products):
            if wg is None:
                continue
            self.accumulators[i] = self.accumulators[i] + wg
            self.seen[i] = True

        if self.window_steps == self.merge_grad:
            self._close_window()
            return True
        return False

    def flush(self) -> bool:
        """Closes an open window at once, dividing by the weight actually summed.

        Returns:
            bool, True if a window was open (and is now applied or skipped);
            False, with nothing changed, if the window was empty.
        """
        if self.window_steps == 0:
            return False
        self._close_window()
        return True

    # -- the update ---------------------------------------------------------

    def _merged(self) -> list:
        """Step 1: `acc / window_weight` ("mean") or `acc` ("sum"); None if unseen."""
        merged = []
        for acc, seen in zip(self.accumulators, self.seen, strict=True):
            if not seen:
                merged.append(None)
            elif self.reduction == "mean":
                with np.errstate(divide="ignore", invalid="ignore"):
                    merged.append((acc / self.window_weight).astype(_F32))
            else:
                merged.append(acc.copy())
        return merged

    @staticmethod
    def _global_norm(grads: list) -> np.float32:
        """`sqrt(sum_i sum(g_i**2))` over the non-None entries, float32."""
        total = _F32(0)
        with np.errstate(over="ignore", invalid="ignore"):
            for g in grads:
                if g is not None:
                    total = _F32(total + np.sum(np.square(g), dtype=_F32))
            return _F32(np.sqrt(total))

    def _clip(self, grads: list) -> list:
        """Step 4: clipvalue, then clipnorm (per variable) or global_clipnorm."""
        out = [None if g is None else g.copy() for g in grads]
        if self.clipvalue is not None:
            c = _F32(self.clipvalue)
            out = [None if g is None else np.clip(g, -c, c) for g in out]
        if self.clipnorm is not None:
            c = _F32(self.clipnorm)
            for i, g in enumerate(out):
                if g is None:
                    continue
                norm = _F32(np.sqrt(np.sum(np.square(g), dtype=_F32)))
                out[i] = (g * c / max(norm, c)).astype(_F32)
        if self.global_clipnorm is not None:
            c = _F32(self.global_clipnorm)
            norm = self._global_norm(out)
            out = [None if g is None else (g * c / max(norm, c)).astype(_F32) for g in out]
        return out

    def _close_window(self) -> None:
        if self.window_weight == 0:
            self._reset_window()
            return
        merged = self._merged()
        self.last_grad_norm = self._global_norm(merged)
        if self.on_nonfinite == "skip" and not _all_finite(merged):
            self.skipped_updates += 1
        else:
            clipped = self._clip(merged)
            self.handed.append(_copy_list(clipped))
            self.inner.step(self.params, clipped)
            self.iterations += 1
            if self.use_ema:
                self._update_ema()
        self._reset_window()

    def _update_ema(self) -> None:
        """Step 7: `ema = m * ema + (1 - m) * w` for every variable, then overwrite."""
        m = ema_momentum_at(self.iterations - 1, self.ema_momentum, self.ema_warmup)
        m32 = _F32(m)
        one_minus_m = _F32(1.0 - m)
        for i, w in enumerate(self.params):
            self.ema[i] = (m32 * self.ema[i] + one_minus_m * w).astype(_F32)
        f = self.ema_overwrite_frequency
        if f is not None and self.iterations % f == 0:
            for i, e in enumerate(self.ema):
                self.params[i][...] = e

    def _reset_window(self) -> None:
        """Step 8: reset by assignment, never by subtraction (docs/semantics.md, point 2)."""
        self.accumulators = [np.zeros_like(p) for p in self.params]
        self.seen = [False] * len(self.params)
        self.window_steps = 0
        self.window_weight = _F32(0)


def merge_stream(
    stream: list, merge_grad: int, reduction: str = "mean", flush: bool = False
) -> list:
    """The merged gradient lists of a stream, one per closed window (no clipping).

    Written apart from `RefAccum` (a second derivation of the same formula)::

        merged_i = sum_k(w_k * g_ik) / sum_k(w_k)     # "mean"
        merged_i = sum_k(w_k * g_ik)                  # "sum"

    over the micro-steps `k` of each window, float32; None for a variable with
    no gradient in the whole window. Nothing is checked for finiteness.

    Args:
        stream: list of `(grads, weight)` pairs, one per micro-step.
        merge_grad: int >= 1, micro-steps per window.
        reduction: "mean" or "sum". Defaults to "mean".
        flush: bool, also merge a trailing partial window. Defaults to False.

    Returns:
        list of gradient lists, one per window.
    """
    windows = [stream[k : k + merge_grad] for k in range(0, len(stream), merge_grad)]
    if windows and len(windows[-1]) < merge_grad and not flush:
        windows.pop()
    out = []
    for window in windows:
        n_vars = len(window[0][0])
        total_weight = _F32(0)
        for _, weight in window:
            total_weight = _F32(total_weight + _F32(weight))
        merged = []
        for i in range(n_vars):
            acc = None
            for grads, weight in window:
                if grads[i] is None:
                    continue
                term = _F32(weight) * np.asarray(grads[i], dtype=_F32)
                acc = term if acc is None else acc + term
            if acc is not None and reduction == "mean":
                with np.errstate(divide="ignore", invalid="ignore"):
                    acc = (acc / total_weight).astype(_F32)
            merged.append(acc)
        out.append(merged)
    return out
