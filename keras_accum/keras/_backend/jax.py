"""JAX plumbing: stateless scopes, 0-or-1-trip loops, a jitted eager micro-step.

Knows how JAX runs the contract's steps, never what they compute.

- `model.fit` jits a train step that calls `optimizer.stateless_apply(
  optimizer_variables, grads, trainable_variables)`: every variable is a
  traced value in a `keras.StatelessScope`, an `assign` records a new value,
  and all state is in `optimizer.variables` (passed by position). A branch
  that writes state (the update, the skip) cannot assign inside a
  `lax.cond` (the tracer would leak); it runs as a `lax.while_loop` of 0 or
  1 iterations whose carry is the state: the body maps the carried values
  into a scope of its own, runs the branch, and returns what it assigned;
  the loop's results are assigned outside. A loop, not a conditional: an XLA
  conditional returns every buffer its branches may write, so a micro-step
  that does not update would copy every weight, slot and accumulator; a
  loop that runs zero times touches nothing (with the trainer's donated
  state, in place).
- Eager `apply_gradients` (a custom loop without `jax.jit`): the host knows
  the window position, and with `jit_compile=True` runs that step as one
  `jax.jit` function of the state's values (traced once per step kind and
  gradient structure), then assigns what changed.
- `keras.distribution`: accumulators and shadows take their variable's
  layout (the base plumbing's `accumulator`/`shadow`).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from keras.src.backend.common.stateless_scope import StatelessScope, get_stateless_scope

from keras_accum.keras import _backend as base
from keras_accum.keras import _loss_scale, _window


def _is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


class Plumbing(base.Plumbing):
    # Without `jax_enable_x64` JAX keeps int64 as int32 (and warns at each
    # build); saved files load across backends either way (`_state.loadable`).
    count_dtype = "int32"

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self._jitted = {}
        self._axis_name = None  # inside `shard_map` (`data_axis`): the data axis

    @contextlib.contextmanager
    def data_axis(self, axis_name, values):
        if axis_name is None:
            yield
            return
        if not all(_is_traced(x) for x in values):
            raise ValueError(
                "`axis_name` is for a step traced inside `jax.shard_map` (in `jax.jit`). "
                f"Received: axis_name={axis_name!r} outside a traced step"
            )
        self._axis_name = axis_name
        try:
            yield
        finally:
            self._axis_name = None

    def resolve_jit_compile(self, requested):
        # XLA is JAX's only compiler: a jitted step is faster on every device.
        return bool(requested)

    # ------------------------------------------------------------------ steps
    def traced(self):
        return self.tracing()

    def check_traced_raise(self):
        raise RuntimeError(
            "`on_nonfinite='raise'` cannot raise inside a jitted function (a traced "
            "JAX step cannot raise on a value). Use `on_nonfinite='skip'`, or run "
            "the step eagerly (`model.compile(jit_compile=False)`, or call "
            "`apply_gradients` outside `jax.jit`). Received: on_nonfinite='raise'"
        )

    def state_variables(self) -> list:
        """Every variable a micro-step may read or write, in a fixed order."""
        opt = self.optimizer
        seen, out = set(), []
        for v in list(opt._trainable_variables) + opt.variables + _loss_scale.state_variables(opt):
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
        return out

    def eager_step(self, run, closes, starts, grads, weight):
        opt = self.optimizer
        if not opt.jit_compile or (closes and opt.merge_grad == 1):
            # `merge_grad=1`: every micro-step updates; op by op, as the inner
            # optimizer runs alone in an eager loop, so the two are bit-identical.
            return run(grads, weight, closes=closes, starts=starts)
        variables = self.state_variables()
        key = (closes, starts, len(variables))
        fn = self._jitted.get(key)
        if fn is None:
            fn = self._jitted[key] = _stateless(run, variables, closes=closes, starts=starts)
        values = [v.value for v in variables]
        new_values, finite = fn(values, grads, weight)
        for v, old, new in zip(variables, values, new_values):
            if new is not old:
                v.assign(new)
        return finite

    # ----------------------------------------------------------- control flow
    def run_if(self, pred, fn, otherwise=None):
        if not _is_traced(pred):
            return super().run_if(pred, fn, otherwise)
        self._loop_if(pred, fn)
        if otherwise is not None:
            self._loop_if(jnp.logical_not(pred), otherwise)
        return None

    def _loop_if(self, pred, fn):
        variables = self.state_variables()
        outer = get_stateless_scope()
        if outer is None:
            raise RuntimeError(
                f"AccumOptimizer '{self.optimizer.name}': a traced step must run in a "
                "`keras.StatelessScope` (call `optimizer.stateless_apply` inside `jax.jit`)."
            )
        carried = {id(v) for v in variables}
        init = [v.value for v in variables]
        names = {id(v): v.path for v in variables}

        def body(carry):
            i, values = carry
            with StatelessScope() as scope:
                scope.state_mapping.update(outer.state_mapping)
                for v, x in zip(variables, values):
                    scope.state_mapping[id(v)] = x
                before = dict(scope.state_mapping)
                fn()
            leaked = [
                key
                for key, value in scope.state_mapping.items()
                if key not in carried and value is not before.get(key)
            ]
            if leaked:
                raise RuntimeError(
                    f"AccumOptimizer '{self.optimizer.name}': a conditional step wrote "
                    f"{len(leaked)} variable(s) outside the optimizer's state "
                    f"({sorted(names.get(k, str(k)) for k in leaked)[:3]}); they would be "
                    "lost under jax.jit."
                )
            return i + 1, [scope.get_current_value(v) for v in variables]

        _, new = jax.lax.while_loop(
            lambda carry: carry[0] < pred.astype("int32"), body, (jnp.int32(0), init)
        )
        for v, value in zip(variables, new):
            v.assign(value)

    def close_window(self, closes, phases):
        """The update as flat 0-or-1-trip loops, the decision first.

        Traced, the phases run as: the decision (norm, finite) in a
        `lax.cond` that returns two scalars (the accumulators are read only
        when the window closes, and no buffer passes through a branch); the
        counters and the loss scale by scalar selects; then one loop that
        applies and resets, and one that only resets (an empty or skipped
        window). A loop nested in another would make XLA copy the state both
        carry, on every micro-step; the reset's zeros are made from what the
        inner step wrote (`written`), so that XLA orders them after the
        reads of the accumulators instead of copying those first.
        """
        if closes is False:
            return
        if not self.tracing():
            return super().close_window(closes, phases)
        closes = jnp.asarray(closes)
        if self._axis_name is not None:
            # Inside `shard_map` each device holds its own partial sums: the
            # window's one collective, in place, before anything reads them.
            self._loop_if(closes, self._reduce_window)
        dtype = phases.norm_dtype()
        norm, finite = jax.lax.cond(
            closes,
            lambda: phases.decide(phases.sums()),
            lambda: (jnp.zeros((), dtype), jnp.asarray(True)),
        )
        phases.record(closes, norm, finite)
        applied = jnp.logical_and(closes, phases.ok(finite))
        self._loop_if(applied, lambda: phases.reset(phases.apply(phases.sums(), norm)))
        self._loop_if(jnp.logical_and(closes, jnp.logical_not(applied)), lambda: phases.reset(norm))

    def window_specs(self, split, axis_name):
        from jax.sharding import PartitionSpec

        return [PartitionSpec(axis_name) if s else PartitionSpec() for s in split]

    def _reduce_window(self):
        """Each accumulator's rows combined over the data axis (`_window.rows_by_maximum`)."""
        opt = self.optimizer
        for acc, maximum in zip(opt._accumulators, _window.rows_by_maximum(opt)):
            reduce = jax.lax.pmax if maximum else jax.lax.pmean
            acc.assign(reduce(acc.value, self._axis_name))

    def tracing(self) -> bool:
        """Whether the running step is traced (inside `jax.jit`)."""
        return _is_traced(self.optimizer._window_steps.value)

    def written(self, variables):
        """A scalar made from every variable just written (its first element, if finite)."""
        parts = [jnp.ravel(v.value)[0].astype(jnp.float32) for v in variables if v.value.size > 0]
        token = sum(parts[1:], parts[0]) if parts else jnp.float32(0)
        return jnp.where(jnp.isfinite(token), token, 0.0)

    def zeros_after(self, variable, done, index):
        """Zeros for `variable`, made from `done` (a scalar computed after the reads).

        XLA updates a loop's state in place; zeros with no data dependency on
        the reads of the accumulators may come first as far as it knows, so
        it would copy every accumulator before the reset. `(done + index) * 0`
        (which XLA does not fold for floats) orders them; `index` keeps the
        fills of same-shape accumulators apart (equal fills would be merged
        into one buffer and copied into each).
        """
        if done is None:
            return super().zeros_after(variable, done, index)
        done = jnp.where(jnp.isfinite(done), done, 0.0).astype(jnp.float32)
        return jnp.full(variable.shape, (done + index) * 0, dtype=variable.dtype)

    def assert_finite(self, finite, micro_step):
        pass  # refused at trace time (`check_traced_raise`); eager steps raise on the host

    # ----------------------------------------------------------------- kernels
    def stored_value(self, variable, dtype):
        """`variable`'s value as stored (see the TensorFlow plumbing: XLA's excess precision)."""
        value = variable.value
        if value.dtype == jnp.dtype(dtype) or not jnp.issubdtype(value.dtype, jnp.floating):
            return value.astype(dtype)
        bits = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[value.dtype.itemsize]
        pinned = jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(value, bits), value.dtype
        )
        return pinned.astype(dtype)

    def snapshot(self, variable):
        return variable.value  # immutable

    def held_elsewhere(self, variables):
        """Keras's JAX `fit` takes the values out of the variables for an epoch
        (`_purge_model_variables`) and puts them back at its end, from its last
        finished step: a first train step that raised leaves them out."""
        return any(v._value is None and v._initializer is None for v in variables)


def _stateless(run, variables, **kwargs):
    """`run(grads, weight, **kwargs)` as a jitted function of the variables' values."""

    def step(values, grads, weight):
        with StatelessScope(state_mapping=list(zip(variables, values))) as scope:
            finite = run(grads, weight, **kwargs)
        return [scope.get_current_value(v) for v in variables], finite

    return jax.jit(step)
