"""tf.distribute plumbing for `AccumOptimizer`, kept apart from the merge logic.

The pattern (contract point 14): accumulators are replica-local variables
(`synchronization=ON_READ`, `aggregation=SUM`) that each replica adds into
with no communication; every decision of a micro-step (counters, whether the
window closes, the update itself) is taken once, in cross-replica context,
through `merge_call`; the accumulators are summed across replicas once per
update, inside that update.

Why not a `tf.cond` in replica context: a branch that all-reduces or calls
`merge_call` raises under `MirroredStrategy` inside `tf.function` (every
`model.fit`; keras-team/keras#20582). A `cond` taken in cross-replica context,
on a counter that every replica agrees on, is fine.

Nothing here knows about accumulation; nothing in the merge logic needs to
know whether a strategy is active.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf
from tensorflow.python.distribute import distribute_lib


def num_replicas() -> int:
    """Replicas in sync under the current strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def multi_replica() -> bool:
    return tf.distribute.has_strategy() and num_replicas() > 1


def in_strategy_replica_context() -> bool:
    """True inside `strategy.run` of a strategy (of any number of replicas)."""
    return tf.distribute.has_strategy() and tf.distribute.get_replica_context() is not None


def replica_local_variable(optimizer, shape, dtype, name):
    """A zero-initialised variable that each replica holds and adds into alone.

    Reading it in cross-replica context (saving, a checkpoint, the update)
    gives the sum over replicas; assigning it there spreads `value / n` to
    each of the `n` replicas, so a saved partial sum survives a restore into
    any number of replicas. Without a strategy it is a plain variable.
    """
    with keras.name_scope(optimizer.name, caller=optimizer):
        variable = keras.Variable(
            initializer=keras.initializers.Zeros(),
            shape=shape,
            dtype=dtype,
            trainable=False,
            synchronization="on_read",
            aggregation="sum",
            name=name,
        )
    optimizer._track_variable(variable)
    return variable


def call_in_cross_replica_context(fn, *tensors):
    """Runs `fn(*tensors)` once for all replicas, in cross-replica context.

    In replica context of a strategy (one replica included: Keras's own
    optimizers then `merge_call` too, which a `cond` branch in replica context
    cannot host) this is one `merge_call`:
    `fn` is traced once and sees the first local replica's value of each
    tensor argument (callers pass values that every replica agrees on, such
    as the micro-step's weight). `merge_call` itself communicates nothing; only
    what `fn` reduces does. Anywhere else `fn` is called directly.
    """
    context = tf.distribute.get_replica_context()
    if context is None or not tf.distribute.has_strategy():
        return fn(*tensors)

    def merged(strategy, *per_replica):
        return fn(*[_first_local(strategy, value) for value in per_replica])

    return context.merge_call(merged, args=tensors)


def _first_local(strategy, value):
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return strategy.experimental_local_results(value)[0]


def sum_over_replicas(variables):
    """The replica-local `variables` summed over replicas, as plain tensors.

    Must run in cross-replica context. One batched reduction for all the
    variables (a single all-reduce under `MultiWorkerMirroredStrategy`).
    """
    if not tf.distribute.has_strategy():
        return [tf.convert_to_tensor(v) for v in variables]
    strategy = tf.distribute.get_strategy()
    # Destinations on the variables' own devices: an all-reduce, batched (a
    # single destination would be a slower reduce-to-one, one at a time).
    reduced = strategy.extended.batch_reduce_to(
        tf.distribute.ReduceOp.SUM,
        [(_tf_variable(v), _tf_variable(v)) for v in variables],
    )
    return [strategy.experimental_local_results(r)[0] for r in reduced]


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def is_default(strategy) -> bool:
    """Whether `strategy` is TensorFlow's default (no-op) strategy."""
    return strategy is distribute_lib._get_default_strategy()


@contextlib.contextmanager
def scope_of(strategy):
    """Enters `strategy`'s scope unless a strategy is already entered.

    Decided on entering, so that under `tf.init_scope` it looks at the outer
    graph, where a `tf.function` traced under `strategy.run` may not have the
    strategy in scope.
    """
    if strategy is None or is_default(strategy) or tf.distribute.has_strategy():
        yield
        return
    with strategy.scope():
        yield


def run_in_each_replica(fn, tensors):
    """Calls `fn(tensors)` in replica context on every replica (from cross-replica).

    Keras optimizers apply through `merge_call`, which exists only in replica
    context; Keras's LossScaleOptimizer uses the same construction under a
    strategy. Without one, `fn` is simply called.
    """
    if not tf.distribute.has_strategy():
        return fn(tensors)
    strategy = tf.distribute.get_strategy()
    return strategy.extended.call_for_each_replica(fn, args=(tensors,))


def already_reduced(grads_and_vars):
    """Stands in for a Keras optimizer's `_all_reduce_sum_gradients`.

    Set on the inner optimizer: it is handed gradients that the update
    summed over replicas once already, identical on every replica.
    """
    return list(grads_and_vars)


def local_component(variable):
    """This replica's own copy of a replica-local variable (the variable itself without one).

    `SyncOnReadVariable` refuses scatter updates; its per-replica component,
    a plain resource variable on this replica's device, does not.
    """
    value = _tf_variable(variable)
    if isinstance(value, tf.distribute.DistributedValues):
        return value._get_on_device_or_primary()  # the replica's own, in replica context
    return value
