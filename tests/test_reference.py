"""Tests of the NumPy oracle itself, against numbers worked out by hand.

Each expected value is a literal computed in the comment next to it from the
formula in `docs/semantics.md`, so that the oracle the other tests trust is
itself checked against something other than its own code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

try:  # tests/ on sys.path (pytest's default "prepend" import mode, no __init__.py)
    import cases
    import reference as ref
except ImportError:  # tests/ as a package
    from tests import cases
    from tests import reference as ref

F32 = np.float32


def a(*values) -> np.ndarray:
    return np.array(values, dtype=F32)


def close(actual, expected, rtol=1e-6, atol=1e-7):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, dtype=F32), rtol, atol)


def sgd_accum(params, lr=0.1, momentum=0.0, **kwargs):
    return ref.RefAccum([a(*p) for p in params], ref.RefSGD(lr, momentum), **kwargs)


# -- merge: mean, sum, weighted ------------------------------------------------


def test_mean_of_two_micro_steps():
    acc = sgd_accum([[1.0]], merge_grad=2)
    assert acc.step([a(1.0)]) is False
    close(acc.params[0], [1.0])  # no update on a non-closing micro-step
    assert (acc.iterations, acc.micro_steps, acc.window_steps) == (0, 1, 1)
    assert acc.step([a(3.0)]) is True
    # merged = (1 + 3) / 2 = 2; w = 1 - 0.1 * 2 = 0.8
    close(acc.params[0], [0.8])
    close(acc.handed[0][0], [2.0])
    assert (acc.iterations, acc.micro_steps, acc.window_steps) == (1, 2, 0)
    assert acc.window_weight == 0


def test_sum_of_two_micro_steps():
    acc = sgd_accum([[1.0]], merge_grad=2, reduction="sum")
    acc.step([a(1.0)])
    acc.step([a(3.0)])
    # merged = 1 + 3 = 4; w = 1 - 0.1 * 4 = 0.6
    close(acc.params[0], [0.6])


def test_weighted_mean_and_weighted_sum():
    acc = sgd_accum([[1.0]], merge_grad=2)
    acc.step([a(1.0)], weight=1.0)
    acc.step([a(3.0)], weight=3.0)
    # merged = (1*1 + 3*3) / (1 + 3) = 10 / 4 = 2.5; w = 1 - 0.25 = 0.75
    close(acc.handed[0][0], [2.5])
    close(acc.params[0], [0.75])

    acc = sgd_accum([[1.0]], merge_grad=2, reduction="sum")
    acc.step([a(1.0)], weight=1.0)
    acc.step([a(3.0)], weight=3.0)
    # merged = 1*1 + 3*3 = 10; w = 1 - 0.1 * 10 = 0.0
    close(acc.handed[0][0], [10.0])
    close(acc.params[0], [0.0])


def test_windows_are_independent():
    acc = sgd_accum([[0.0]], lr=1.0, merge_grad=2)
    for g in (1.0, 3.0, 10.0, 20.0):
        acc.step([a(g)])
    # window 1: (1 + 3) / 2 = 2; window 2: (10 + 20) / 2 = 15; w = 0 - 2 - 15 = -17
    close(acc.handed[0][0], [2.0])
    close(acc.handed[1][0], [15.0])
    close(acc.params[0], [-17.0])
    assert acc.iterations == 2 and acc.micro_steps == 4


def test_merge1_is_bit_identical_to_inner_alone():
    params = cases.make_params(seed=3)
    stream = cases.make_stream(cases.AccumCase("m1", merge_grad=1, n_micro=5), seed=3)
    acc = ref.RefAccum(params, ref.RefSGD(0.1, momentum=0.9, nesterov=True), merge_grad=1)
    plain = [p.copy() for p in params]
    sgd = ref.RefSGD(0.1, momentum=0.9, nesterov=True)
    for grads, weight in stream:
        acc.step(grads, weight)
        sgd.step(plain, grads)
    for x, y in zip(acc.params, plain, strict=True):
        np.testing.assert_array_equal(x, y)


# -- None gradients -------------------------------------------------------------


def test_none_in_closing_step_keeps_accumulated_gradient():
    acc = sgd_accum([[1.0], [1.0]], merge_grad=2)
    acc.step([a(2.0), a(4.0)])
    acc.step([None, a(6.0)])
    # divisor is the window weight 2 (None contributes zero, large-batch meaning):
    # merged = [2 / 2, (4 + 6) / 2] = [1, 5]; w = [1 - 0.1, 1 - 0.5] = [0.9, 0.5]
    close(acc.handed[0][0], [1.0])
    close(acc.handed[0][1], [5.0])
    close(acc.params[0], [0.9])
    close(acc.params[1], [0.5])


def test_never_seen_var_untouched_with_its_momentum_buffer():
    acc = sgd_accum([[1.0], [1.0]], momentum=0.9, merge_grad=2)
    acc.step([a(1.0), a(1.0)])
    acc.step([a(1.0), a(1.0)])
    # window 1: merged [1, 1]; b = [1, 1]; w = [0.9, 0.9]
    close(acc.params[1], [0.9])
    acc.step([a(2.0), None])
    acc.step([a(2.0), None])
    # window 2: merged [2, None]; b0 = 0.9 * 1 + 2 = 2.9; w0 = 0.9 - 0.1 * 2.9 = 0.61
    # var 1 got no gradient in the whole window: w1 = 0.9 and b1 = 1 stay.
    assert acc.handed[1][1] is None
    close(acc.params[0], [0.61])
    close(acc.params[1], [0.9])
    close(acc.inner.momentum_buffers[0], [2.9])
    close(acc.inner.momentum_buffers[1], [1.0])
    assert acc.iterations == 2


def test_never_seen_var_in_first_window_gets_no_adam_state():
    acc = ref.RefAccum([a(1.0), a(1.0)], ref.RefAdam(0.1), merge_grad=2)
    acc.step([a(1.0), None])
    acc.step([a(1.0), None])
    close(acc.params[1], [1.0])
    assert 1 not in acc.inner.m and 1 not in acc.inner.v
    assert acc.inner.iterations == 1


# -- flush ----------------------------------------------------------------------


def test_flush_divides_by_the_steps_taken():
    acc = sgd_accum([[1.0]], merge_grad=4)
    for g in (1.0, 2.0, 6.0):
        assert acc.step([a(g)]) is False
    close(acc.params[0], [1.0])
    assert acc.flush() is True
    # merged = (1 + 2 + 6) / 3 = 3 (not / 4); w = 1 - 0.3 = 0.7
    close(acc.handed[0][0], [3.0])
    close(acc.params[0], [0.7])
    assert (acc.iterations, acc.micro_steps, acc.window_steps) == (1, 3, 0)
    assert acc.window_weight == 0
    close(acc.accumulators[0], [0.0])


def test_flush_divides_by_the_weight_sum():
    acc = sgd_accum([[1.0]], merge_grad=4)
    acc.step([a(1.0)], weight=1.0)
    acc.step([a(2.0)], weight=1.0)
    acc.step([a(6.0)], weight=2.0)
    assert acc.flush() is True
    # merged = (1 + 2 + 12) / (1 + 1 + 2) = 15 / 4 = 3.75; w = 1 - 0.375 = 0.625
    close(acc.params[0], [0.625])


def test_flush_of_empty_window_is_noop():
    acc = sgd_accum([[1.0]], merge_grad=2, use_ema=True)
    assert acc.flush() is False
    assert acc.iterations == 0 and acc.handed == [] and acc.last_grad_norm is None
    acc.step([a(1.0)])
    acc.step([a(1.0)])
    before = (acc.params[0].copy(), acc.ema[0].copy(), acc.iterations, acc.micro_steps)
    assert acc.flush() is False  # the window just closed: nothing is open
    close(acc.params[0], before[0])
    close(acc.ema[0], before[1])
    assert (acc.iterations, acc.micro_steps) == before[2:]
    assert len(acc.handed) == 1


# -- EMA ------------------------------------------------------------------------


def test_ema_momentum_values():
    assert ref.ema_momentum_at(0, 0.99, False) == 0.0
    assert ref.ema_momentum_at(0, 0.99, True) == 0.0
    assert ref.ema_momentum_at(1, 0.99, False) == 0.99
    assert ref.ema_momentum_at(1, 0.99, True) == pytest.approx(2 / 11)  # (1+1)/(10+1)
    assert ref.ema_momentum_at(2, 0.99, True) == pytest.approx(0.25)  # (1+2)/(10+2)
    assert ref.ema_momentum_at(5, 0.5, True) == pytest.approx(0.4)  # min(0.5, 6/15)
    assert ref.ema_momentum_at(6, 0.5, True) == pytest.approx(0.4375)  # min(0.5, 7/16)
    assert ref.ema_momentum_at(9, 0.5, True) == 0.5  # min(0.5, 10/19)
    assert ref.ema_momentum_at(10_000, 0.99, True) == 0.99  # 10001/10010 > 0.99


def test_ema_first_update_copies_then_follows():
    acc = sgd_accum([[1.0]], use_ema=True, ema_momentum=0.5)
    acc.step([a(1.0)])
    # w = 0.9; first update: ema = w = 0.9
    close(acc.params[0], [0.9])
    close(acc.ema[0], [0.9])
    acc.step([a(1.0)])
    # w = 0.8; ema = 0.5 * 0.9 + 0.5 * 0.8 = 0.85
    close(acc.ema[0], [0.85])
    acc.step([a(1.0)])
    # w = 0.7; ema = 0.5 * 0.85 + 0.5 * 0.7 = 0.775
    close(acc.ema[0], [0.775])
    close(acc.params[0], [0.7])


def test_ema_warmup_momentum_in_use():
    acc = sgd_accum([[1.0]], use_ema=True, ema_momentum=0.99, ema_warmup=True)
    for _ in range(3):
        acc.step([a(1.0)])
    # w: 0.9, 0.8, 0.7; m: 0, 2/11, 3/12
    # ema1 = 0.9; ema2 = (2/11) * 0.9 + (9/11) * 0.8 = 9/11
    # ema3 = 0.25 * 9/11 + 0.75 * 0.7 = 9/44 + 21/40 = 321/440 = 0.7295454...
    close(acc.ema[0], [321 / 440])


def test_ema_only_moves_on_updates():
    acc = sgd_accum([[1.0]], merge_grad=2, use_ema=True, ema_momentum=0.5)
    acc.step([a(5.0)])
    close(acc.ema[0], [1.0])  # still the initial copy: no update yet
    acc.step([a(1.0)])
    # merged 3; w = 1 - 0.3 = 0.7; first update copies
    close(acc.ema[0], [0.7])
    acc.step([a(1.0)])
    close(acc.ema[0], [0.7])


def test_ema_follows_vars_without_gradient():
    acc = sgd_accum([[1.0], [2.0]], use_ema=True, ema_momentum=0.5)
    acc.step([a(1.0), a(1.0)])  # w = [0.9, 1.9]; ema = [0.9, 1.9]
    acc.step([a(1.0), a(1.0)])  # w = [0.8, 1.8]; ema = [0.85, 1.85]
    acc.step([a(1.0), None])  # w = [0.7, 1.8]
    # ema = [0.5 * 0.85 + 0.5 * 0.7, 0.5 * 1.85 + 0.5 * 1.8] = [0.775, 1.825]
    close(acc.ema[0], [0.775])
    close(acc.ema[1], [1.825])


def test_ema_overwrite_every_second_update():
    acc = sgd_accum([[1.0]], use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2)
    acc.step([a(1.0)])
    # update 1: w = 0.9; ema = 0.9; 1 % 2 != 0: no overwrite
    close(acc.params[0], [0.9])
    acc.step([a(1.0)])
    # update 2: w = 0.8; ema = 0.85; overwrite: w = 0.85
    close(acc.ema[0], [0.85])
    close(acc.params[0], [0.85])
    acc.step([a(1.0)])
    # update 3: w = 0.75; ema = 0.5 * 0.85 + 0.5 * 0.75 = 0.8; no overwrite
    close(acc.params[0], [0.75])
    close(acc.ema[0], [0.8])
    acc.step([a(1.0)])
    # update 4: w = 0.65; ema = 0.5 * 0.8 + 0.5 * 0.65 = 0.725; overwrite
    close(acc.params[0], [0.725])
    close(acc.ema[0], [0.725])


# -- clipping -------------------------------------------------------------------


def test_clipvalue_on_the_merged_gradient():
    acc = sgd_accum([[0.0, 0.0]], lr=1.0, merge_grad=2, clipvalue=0.5)
    acc.step([a(1.0, -3.0)])
    acc.step([a(3.0, 1.0)])
    # merged = [2, -1] (norm sqrt(5), recorded before clipping) -> clip [0.5, -0.5]
    close(acc.handed[0][0], [0.5, -0.5])
    close(acc.params[0], [-0.5, 0.5])
    close(acc.last_grad_norm, math.sqrt(5.0))


def test_clipnorm_per_variable():
    acc = sgd_accum([[0.0, 0.0], [0.0, 0.0]], lr=1.0, merge_grad=2, clipnorm=1.0)
    acc.step([a(2.0, 4.0), a(0.3, 0.4)])
    acc.step([a(4.0, 4.0), a(0.3, 0.4)])
    # var 0: merged [3, 4], norm 5 -> [3, 4] * 1 / 5 = [0.6, 0.8]
    #   (clipping each micro-step instead would give a different answer)
    # var 1: merged [0.3, 0.4], norm 0.5 < 1 -> unchanged
    close(acc.handed[0][0], [0.6, 0.8])
    close(acc.handed[0][1], [0.3, 0.4])
    close(acc.last_grad_norm, math.sqrt(25.25))


def test_global_clipnorm_skips_unseen_vars():
    acc = sgd_accum([[0.0, 0.0], [0.0, 0.0], [7.0]], lr=1.0, global_clipnorm=1.0)
    acc.step([a(3.0, 0.0), a(0.0, 4.0), None])
    # global norm sqrt(9 + 16) = 5 -> scale 1/5: [0.6, 0], [0, 0.8]; var 2 unseen
    close(acc.handed[0][0], [0.6, 0.0])
    close(acc.handed[0][1], [0.0, 0.8])
    assert acc.handed[0][2] is None
    close(acc.params[2], [7.0])
    close(acc.last_grad_norm, 5.0)


def test_global_clipnorm_below_threshold_is_identity():
    acc = sgd_accum([[0.0]], lr=1.0, global_clipnorm=10.0)
    acc.step([a(3.0)])
    close(acc.handed[0][0], [3.0])


def test_clipvalue_then_global_clipnorm():
    acc = sgd_accum([[0.0, 0.0], [0.0, 0.0]], lr=1.0, clipvalue=1.0, global_clipnorm=1.0)
    acc.step([a(3.0, 0.0), a(0.0, -4.0)])
    # clipvalue first: [1, 0], [0, -1]; global norm sqrt(2) -> * 1/sqrt(2)
    # (global first would give [0.6, 0], [0, -0.8], which clipvalue leaves alone)
    h = 1 / math.sqrt(2.0)
    close(acc.handed[0][0], [h, 0.0])
    close(acc.handed[0][1], [0.0, -h])
    close(acc.last_grad_norm, 5.0)  # before any clipping


# -- non-finite gradients ---------------------------------------------------------


def test_skip_leaves_state_and_starts_next_window_clean():
    acc = sgd_accum([[1.0]], momentum=0.9, merge_grad=2, use_ema=True, ema_momentum=0.5)
    acc.step([a(1.0)])
    acc.step([a(1.0)])
    # window 1: merged 1; b = 1; w = 0.9; ema = 0.9
    close(acc.params[0], [0.9])
    assert acc.step([a(math.inf)]) is False
    assert acc.step([a(1.0)]) is True  # the window closes, skipped
    close(acc.params[0], [0.9])
    close(acc.ema[0], [0.9])
    close(acc.inner.momentum_buffers[0], [1.0])
    assert acc.inner.steps == 1 and len(acc.handed) == 1
    assert (acc.iterations, acc.skipped_updates, acc.micro_steps) == (1, 1, 4)
    assert acc.last_grad_norm == math.inf
    assert acc.window_steps == 0 and acc.window_weight == 0
    close(acc.accumulators[0], [0.0])  # reset by assignment: inf - inf would be nan
    acc.step([a(2.0)])
    acc.step([a(2.0)])
    # window 3: merged 2; b = 0.9 * 1 + 2 = 2.9; w = 0.9 - 0.29 = 0.61
    close(acc.params[0], [0.61])
    assert (acc.iterations, acc.skipped_updates) == (2, 1)
    close(acc.last_grad_norm, 2.0)


def test_skip_nan_records_nan_norm_and_skips_all_vars():
    acc = sgd_accum([[1.0], [1.0]], merge_grad=2)
    acc.step([a(math.nan), a(1.0)])
    acc.step([a(1.0), a(1.0)])
    # var 1 is finite, but the whole window is discarded
    close(acc.params[0], [1.0])
    close(acc.params[1], [1.0])
    assert acc.skipped_updates == 1 and acc.iterations == 0
    assert math.isnan(acc.last_grad_norm)


def test_skip_on_flush():
    acc = sgd_accum([[1.0]], merge_grad=4)
    acc.step([a(-math.inf)])
    assert acc.flush() is True
    close(acc.params[0], [1.0])
    assert acc.skipped_updates == 1 and acc.window_steps == 0


def test_raise_names_the_micro_step_and_changes_nothing():
    acc = sgd_accum([[1.0]], merge_grad=2, on_nonfinite="raise")
    acc.step([a(1.0)])
    with pytest.raises(FloatingPointError, match="micro-step 2"):
        acc.step([a(math.nan)])
    assert (acc.micro_steps, acc.window_steps, acc.iterations) == (1, 1, 0)
    assert acc.window_weight == 1
    close(acc.accumulators[0], [1.0])
    close(acc.params[0], [1.0])
    acc.step([a(3.0)])  # the run can go on: merged (1 + 3) / 2 = 2; w = 0.8
    close(acc.params[0], [0.8])
    with pytest.raises(FloatingPointError, match="micro-step 3"):
        acc.step([a(math.inf)])


def test_raise_on_weighted_product_overflow():
    acc = sgd_accum([[1.0]], merge_grad=2, on_nonfinite="raise")
    # 3e38 is finite in float32, 2 * 3e38 is not
    with pytest.raises(FloatingPointError, match="micro-step 1"):
        acc.step([a(3e38)], weight=2.0)
    assert acc.micro_steps == 0 and acc.window_steps == 0


def test_ignore_passes_nan_to_the_inner_optimizer():
    acc = sgd_accum([[1.0, 1.0]], merge_grad=2, on_nonfinite="ignore")
    acc.step([a(math.nan, 1.0)])
    acc.step([a(1.0, 1.0)])
    assert math.isnan(acc.handed[0][0][0])
    close(acc.handed[0][0][1:], [1.0])
    assert math.isnan(acc.params[0][0])
    close(acc.params[0][1:], [0.9])
    assert (acc.iterations, acc.skipped_updates) == (1, 0)
    assert math.isnan(acc.last_grad_norm)


# -- inner optimizers ---------------------------------------------------------


def test_sgd_momentum_and_nesterov():
    plain, nest = [a(1.0)], [a(1.0)]
    sgd, nsgd = ref.RefSGD(0.1, momentum=0.9), ref.RefSGD(0.1, momentum=0.9, nesterov=True)
    sgd.step(plain, [a(1.0)])
    nsgd.step(nest, [a(1.0)])
    # plain: b = 1; w = 1 - 0.1 = 0.9
    # nesterov: b = 1; g' = 1 + 0.9 * 1 = 1.9; w = 1 - 0.19 = 0.81
    close(plain[0], [0.9])
    close(nest[0], [0.81])
    sgd.step(plain, [a(1.0)])
    nsgd.step(nest, [a(1.0)])
    # plain: b = 0.9 + 1 = 1.9; w = 0.9 - 0.19 = 0.71
    # nesterov: b = 1.9; g' = 1 + 0.9 * 1.9 = 2.71; w = 0.81 - 0.271 = 0.539
    close(plain[0], [0.71])
    close(nest[0], [0.539])
    nsgd.step(nest, [None])
    close(nest[0], [0.539])
    close(nsgd.momentum_buffers[0], [1.9])


def test_adam_one_step():
    params = [a(1.0)]
    adam = ref.RefAdam(0.1)
    adam.step(params, [a(2.0)])
    # t = 1: alpha = 0.1 * sqrt(1 - 0.999) / (1 - 0.9) = sqrt(0.001) = 0.0316228
    # m = 0.2; v = 0.001 * 4 = 0.004; sqrt(v) = 0.0632456
    # w = 1 - alpha * m / (sqrt(v) + 1e-7) = 1 - 0.1 / (1 + 1.58e-6) = 0.9000001581
    close(params[0], [0.9000001581])
    close(adam.m[0], [0.2])
    close(adam.v[0], [0.004])
    assert adam.iterations == 1


def test_adam_step_counter_is_global():
    params = [a(1.0), a(1.0)]
    adam = ref.RefAdam(0.1)
    adam.step(params, [a(1.0), None])
    close(params[1], [1.0])
    adam.step(params, [a(1.0), a(1.0)])
    # var 1's first step runs at t = 2:
    # alpha = 0.1 * sqrt(1 - 0.999**2) / (1 - 0.9**2) = 0.1 * 0.0447102 / 0.19 = 0.0235317
    # m = 0.1; v = 0.001; w = 1 - 0.0235317 * 0.1 / (0.0316228 + 1e-7) = 0.9255866
    # (a per-variable counter, t = 1, would give 1 - 0.1 = 0.9)
    close(params[1], [0.9255866])


def test_recording_inner_changes_nothing():
    inner = ref.RecordingInner()
    acc = ref.RefAccum([a(1.0), a(2.0)], inner, merge_grad=2, use_ema=True)
    acc.step([a(1.0), None])
    acc.step([a(3.0), None])
    close(acc.params[0], [1.0])
    assert len(inner.calls) == 1
    close(inner.calls[0][0], [2.0])
    assert inner.calls[0][1] is None


# -- merge_stream, the case table ------------------------------------------------


def test_merge_stream_by_hand():
    stream = [([a(1.0), None], 1.0), ([a(3.0), a(2.0)], 3.0), ([a(5.0), None], 1.0)]
    merged = ref.merge_stream(stream, merge_grad=2)
    # one closed window: [(1 + 9) / 4, 6 / 4] = [2.5, 1.5]; the open one is dropped
    assert len(merged) == 1
    close(merged[0][0], [2.5])
    close(merged[0][1], [1.5])
    merged = ref.merge_stream(stream, merge_grad=2, reduction="sum", flush=True)
    # sum: [10, 6]; flushed window: [5, None]
    close(merged[0][0], [10.0])
    close(merged[0][1], [6.0])
    close(merged[1][0], [5.0])
    assert merged[1][1] is None


@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.id)
def test_merge_stream_agrees_with_ref_accum(case):
    stream = cases.make_stream(case)
    inner = ref.RecordingInner()
    kwargs = {k: v for k, v in case.kwargs.items() if k in ("merge_grad", "reduction")}
    acc = ref.RefAccum(cases.make_params(), inner, **kwargs)
    for grads, weight in stream:
        acc.step(grads, weight)
    if case.flush_at_end:
        acc.flush()
    expected = ref.merge_stream(stream, case.merge_grad, case.reduction, case.flush_at_end)
    assert len(inner.calls) == len(expected) == case.n_updates == acc.iterations
    for got, want in zip(inner.calls, expected, strict=True):
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.id)
def test_every_case_runs_on_the_oracle(case):
    acc = ref.RefAccum(cases.make_params(), ref.RefSGD(0.1, momentum=0.9), **case.kwargs)
    start = [p.copy() for p in acc.params]
    for grads, weight in cases.make_stream(case):
        acc.step(grads, weight)
    if case.flush_at_end:
        assert acc.flush() is True
    assert acc.iterations == case.n_updates and acc.skipped_updates == 0
    assert acc.micro_steps == case.n_micro
    assert all(np.all(np.isfinite(p)) for p in acc.params)
    assert not np.allclose(acc.params[0], start[0])  # something moved
    for grads in acc.handed:
        for g in grads:
            if g is None:
                continue
            if "clipvalue" in case.kwargs:
                assert np.max(np.abs(g)) <= case.kwargs["clipvalue"] + 1e-6
            if "clipnorm" in case.kwargs:
                assert np.linalg.norm(g) <= case.kwargs["clipnorm"] * (1 + 1e-5)
        if "global_clipnorm" in case.kwargs:
            norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads if g is not None))
            assert norm <= case.kwargs["global_clipnorm"] * (1 + 1e-5)


def test_large_batch_equivalence_on_linear_regression():
    # Mean-squared loss of y = X w over 8 samples; gradient 2/N X^T (X w - y).
    # merge_grad=4 on micro-batches of 2 must match one batch of 8 (point 3).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3)).astype(F32)
    y = rng.standard_normal(8).astype(F32)

    def grad(w, xb, yb):
        return (2.0 / len(yb)) * xb.T @ (xb @ w - yb)

    w0 = rng.standard_normal(3).astype(F32)
    big = [w0.copy()]
    big_opt = ref.RefAdam(0.05)
    acc = ref.RefAccum([w0], ref.RefAdam(0.05), merge_grad=4)
    for _ in range(3):
        big_opt.step(big, [grad(big[0], x, y).astype(F32)])
        for k in range(4):
            xb, yb = x[2 * k : 2 * k + 2], y[2 * k : 2 * k + 2]
            acc.step([grad(acc.params[0], xb, yb).astype(F32)])
    assert acc.iterations == 3
    np.testing.assert_allclose(acc.params[0], big[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(big[0], w0)


def test_case_table_shape():
    ids = [c.id for c in cases.CASES]
    assert len(ids) == len(set(ids))
    case = next(c for c in cases.CASES if c.id == "merge4_none_whole_window")
    stream = cases.make_stream(case)
    assert len(stream) == case.n_micro
    assert all(stream[k][0][2] is None for k in range(4, 8))
    assert stream[3][0][2] is not None
    assert [g.shape for g in stream[0][0]] == [tuple(s) for s in cases.SHAPES]
    assert all(g.dtype == F32 for g in stream[0][0])
    assert case.kwargs == {"merge_grad": 4, "reduction": "mean"}
    ema = next(c for c in cases.CASES if c.id == "ema_merge4_warmup_overwrite2")
    assert ema.kwargs["ema_overwrite_frequency"] == 2 and ema.kwargs["use_ema"] is True
    with pytest.raises(ValueError, match="weights"):
        cases.AccumCase("bad", merge_grad=2, n_micro=3, weights=(1.0,))


def test_nonfinite_stream_places_one_value():
    stream = cases.nonfinite_stream(2, math.nan)
    finite = cases.make_stream(cases.AccumCase("x", merge_grad=4, n_micro=8))
    assert len(stream) == 8
    bad = [
        (k, i)
        for k, (grads, _) in enumerate(stream)
        for i, g in enumerate(grads)
        if not np.all(np.isfinite(g))
    ]
    assert bad == [(2, 0)]
    assert math.isnan(stream[2][0][0][0, 0])
    np.testing.assert_array_equal(stream[2][0][0].flat[1:], finite[2][0][0].flat[1:])
    assert len(cases.NONFINITE_CASES) == 24
    assert len({c.id for c in cases.NONFINITE_CASES}) == 24


@pytest.mark.parametrize("case", cases.NONFINITE_CASES, ids=lambda c: c.id)
def test_nonfinite_cases_on_the_oracle(case):
    acc = ref.RefAccum(cases.make_params(), ref.RefSGD(0.1), **case.kwargs)
    start = [p.copy() for p in acc.params]
    stream = case.stream()
    if case.on_nonfinite == "raise":
        for grads, weight in stream[: case.position]:
            acc.step(grads, weight)
        with pytest.raises(FloatingPointError, match=f"micro-step {case.position + 1}"):
            acc.step(*stream[case.position])
        assert acc.micro_steps == case.position
        return
    for grads, weight in stream[: case.merge_grad]:
        acc.step(grads, weight)
    if case.on_nonfinite == "skip":
        assert (acc.iterations, acc.skipped_updates) == (0, 1)
        for p, s in zip(acc.params, start, strict=True):
            np.testing.assert_array_equal(p, s)
    else:
        assert (acc.iterations, acc.skipped_updates) == (1, 0)
        assert not np.isfinite(acc.params[0][0, 0])
        assert np.all(np.isfinite(acc.params[0].flat[1:]))
    for grads, weight in stream[case.merge_grad :]:
        acc.step(grads, weight)
    assert acc.iterations == (1 if case.on_nonfinite == "skip" else 2)
    assert np.isfinite(acc.last_grad_norm)  # the second window started clean
