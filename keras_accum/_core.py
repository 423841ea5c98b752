"""Framework-free semantics shared by the Keras optimizer and the torch mirror.

This module imports neither TensorFlow nor torch. It holds the one vocabulary
of the library (argument names, defaults, accepted values), the validation of
every constructor argument with the house error messages, and the pure
arithmetic of the contract that does not touch tensors (the EMA decay, the
state signature that guards against loading differently configured state).

See ``docs/semantics.md`` for the contract these pieces implement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any

#: Version of the saved-state layout written by both sides. Bump it when the
#: layout changes, and teach the loaders to read (or refuse) the old one.
FORMAT_VERSION = 1

REDUCTIONS = ("mean", "sum")
NONFINITE_POLICIES = ("skip", "raise", "ignore")
ACCUMULATOR_DTYPES = ("float16", "bfloat16", "float32", "float64")

#: The configuration keys whose values give the saved state its meaning.
#: Loading state saved under other values raises (docs/semantics.md, point 12):
#: a different window length, reduction, accumulator dtype or EMA setting
#: would silently reinterpret the accumulators, counters or shadows.
#: Clipping, EMA momentum and the non-finite policy only act on future
#: updates, so they may change between a save and a resume.
STATE_SIGNATURE_KEYS = (
    "merge_grad",
    "reduction",
    "accumulator_dtype",
    "use_ema",
)


def _received(name: str, value: Any) -> str:
    return f"Received: {name}={value!r}"


def _is_int(value: Any) -> bool:
    # `True` is an int to Python, never to a user who wrote `merge_grad=True`.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_merge_grad(merge_grad: Any) -> int:
    """Returns `merge_grad` as an int, or raises naming the value."""
    if not _is_int(merge_grad):
        raise TypeError(
            "`merge_grad` must be an int >= 1. " + _received("merge_grad", merge_grad)
        )
    if merge_grad < 1:
        raise ValueError(
            "`merge_grad` must be an int >= 1. " + _received("merge_grad", merge_grad)
        )
    return int(merge_grad)


def validate_choice(name: str, value: Any, choices: tuple) -> str:
    """Checks that `value` is one of the strings in `choices`."""
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be one of {', '.join(repr(c) for c in choices)}. "
            + _received(name, value)
        )
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(c) for c in choices)}. "
            + _received(name, value)
        )
    return value


def validate_accumulator_dtype(accumulator_dtype: Any, allow_none: bool = False):
    """Checks a dtype given by name (the torch side converts its dtypes first).

    `None` means "the parameter's own dtype", which only the torch side allows
    (it lets gradients accumulate in `.grad` at no memory cost).
    """
    if accumulator_dtype is None and allow_none:
        return None
    choices = ACCUMULATOR_DTYPES + ((None,) if allow_none else ())
    if not isinstance(accumulator_dtype, str):
        raise TypeError(
            f"`accumulator_dtype` must be one of {', '.join(repr(c) for c in choices)}. "
            + _received("accumulator_dtype", accumulator_dtype)
        )
    if accumulator_dtype not in ACCUMULATOR_DTYPES:
        raise ValueError(
            f"`accumulator_dtype` must be one of {', '.join(repr(c) for c in choices)}. "
            + _received("accumulator_dtype", accumulator_dtype)
        )
    return accumulator_dtype


def validate_positive_float(name: str, value: Any, allow_none: bool = True):
    """Checks a finite float > 0 (or None)."""
    if value is None and allow_none:
        return None
    if not _is_real(value):
        raise TypeError(
            f"`{name}` must be a float > 0 or None. " + _received(name, value)
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"`{name}` must be a float > 0 or None. " + _received(name, value)
        )
    return float(value)


def validate_positive_int_or_none(name: str, value: Any):
    """Checks an int >= 1 (or None)."""
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(f"`{name}` must be an int >= 1 or None. " + _received(name, value))
    if value < 1:
        raise ValueError(f"`{name}` must be an int >= 1 or None. " + _received(name, value))
    return int(value)


def validate_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool. " + _received(name, value))
    return value


def validate_ema_momentum(ema_momentum: Any) -> float:
    if not _is_real(ema_momentum):
        raise TypeError(
            "`ema_momentum` must be a float in [0, 1]. "
            + _received("ema_momentum", ema_momentum)
        )
    if not 0.0 <= ema_momentum <= 1.0:
        raise ValueError(
            "`ema_momentum` must be a float in [0, 1]. "
            + _received("ema_momentum", ema_momentum)
        )
    return float(ema_momentum)


def validate_weight(weight: Any):
    """Checks a per-micro-step weight given as a Python number.

    Tensor weights are checked by the framework side (they may be traced).
    """
    if weight is None:
        return None
    if not _is_real(weight):
        raise TypeError(
            "`weight` must be a finite number >= 0 (a sample or token count). "
            + _received("weight", weight)
        )
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(
            "`weight` must be a finite number >= 0 (a sample or token count). "
            + _received("weight", weight)
        )
    return float(weight)


def bad_weight_tensor(weight: Any) -> TypeError:
    """The error for a `weight` that is neither a number nor a scalar numeric tensor."""
    return TypeError(
        "`weight` must be a finite number >= 0 (a sample or token count), or a "
        f"scalar numeric tensor. Received: weight={weight!r}"
    )


def check_num_gradients(num_grads: int, num_variables: int) -> None:
    """Raises when a gradient list does not line up with the variables."""
    if num_grads != num_variables:
        raise ValueError(
            "`grads` must have one entry per variable (None for a variable "
            f"without gradient). Received: len(grads)={num_grads} for "
            f"{num_variables} variables"
        )


#: The wrapper's argument for each feature an inner optimizer may already have.
WRAPPER_ARGUMENT = {"gradient_accumulation_steps": "merge_grad"}


def inner_feature_error(feature: str, value: Any) -> ValueError:
    """The error for an inner optimizer that already does one of our jobs.

    It names the wrapper's own argument (`merge_grad` for Keras's
    `gradient_accumulation_steps`) and the one-line conversion, since the
    inner optimizer's name for it is not ours.
    """
    ours = WRAPPER_ARGUMENT.get(feature, feature)
    return ValueError(
        f"The inner optimizer already has `{feature}={value!r}`; AccumOptimizer "
        f"does this itself, once per update. Pass `{ours}={value!r}` to "
        f"AccumOptimizer and leave `{feature}` off the inner optimizer, or convert "
        "it in one line with `AccumOptimizer.from_keras_optimizer(optimizer)`, which "
        f"moves every such setting to the wrapper. Received: optimizer with "
        f"{feature}={value!r}"
    )


@dataclasses.dataclass(frozen=True)
class AccumConfig:
    """The validated, fixed configuration of an AccumOptimizer (either side).

    Everything here is a plain Python value fixed at construction: what
    changes between steps is framework state, never config.
    """

    merge_grad: int = 1
    reduction: str = "mean"
    accumulator_dtype: str | None = "float32"
    use_ema: bool = False
    ema_momentum: float = 0.99
    ema_overwrite_frequency: int | None = None
    ema_warmup: bool = False
    clipnorm: float | None = None
    clipvalue: float | None = None
    global_clipnorm: float | None = None
    on_nonfinite: str = "skip"

    @classmethod
    def create(cls, allow_none_dtype: bool = False, **kwargs) -> AccumConfig:
        """Validates every argument, in signature order, and builds the config."""
        merge_grad = validate_merge_grad(kwargs.get("merge_grad", 1))
        reduction = validate_choice("reduction", kwargs.get("reduction", "mean"), REDUCTIONS)
        accumulator_dtype = validate_accumulator_dtype(
            kwargs.get("accumulator_dtype", None if allow_none_dtype else "float32"),
            allow_none=allow_none_dtype,
        )
        use_ema = validate_bool("use_ema", kwargs.get("use_ema", False))
        ema_momentum = validate_ema_momentum(kwargs.get("ema_momentum", 0.99))
        ema_overwrite_frequency = validate_positive_int_or_none(
            "ema_overwrite_frequency", kwargs.get("ema_overwrite_frequency")
        )
        ema_warmup = validate_bool("ema_warmup", kwargs.get("ema_warmup", False))
        clipnorm = validate_positive_float("clipnorm", kwargs.get("clipnorm"))
        clipvalue = validate_positive_float("clipvalue", kwargs.get("clipvalue"))
        global_clipnorm = validate_positive_float(
            "global_clipnorm", kwargs.get("global_clipnorm")
        )
        if clipnorm is not None and global_clipnorm is not None:
            raise ValueError(
                "Only one of `clipnorm` and `global_clipnorm` can be set. "
                f"Received: clipnorm={clipnorm!r}, global_clipnorm={global_clipnorm!r}"
            )
        on_nonfinite = validate_choice(
            "on_nonfinite", kwargs.get("on_nonfinite", "skip"), NONFINITE_POLICIES
        )
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"Unknown argument(s): {sorted(unknown)}")
        return cls(
            merge_grad=merge_grad,
            reduction=reduction,
            accumulator_dtype=accumulator_dtype,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            ema_warmup=ema_warmup,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            on_nonfinite=on_nonfinite,
        )

    def to_dict(self) -> dict:
        """The configuration as a plain dict (argument name to value)."""
        return dataclasses.asdict(self)

    @property
    def clips(self) -> bool:
        """Whether any of `clipnorm`, `clipvalue`, `global_clipnorm` is set."""
        return (
            self.clipnorm is not None
            or self.clipvalue is not None
            or self.global_clipnorm is not None
        )

    def state_signature(self, inner_class: str) -> dict:
        """What the saved state means: format version, inner class, key config."""
        sig = {k: getattr(self, k) for k in STATE_SIGNATURE_KEYS}
        sig["format_version"] = FORMAT_VERSION
        sig["inner_optimizer"] = inner_class
        return sig


def encode_signature(signature: dict) -> str:
    return json.dumps(signature, sort_keys=True)


def check_state_signature(saved: dict | str, current: dict | str) -> None:
    """Raises a ValueError naming every key where saved and current state differ."""
    if isinstance(saved, (bytes, bytearray)):
        saved = saved.decode("utf-8")
    if isinstance(saved, str):
        saved = json.loads(saved)
    if isinstance(current, str):
        current = json.loads(current)
    diffs = [
        f"{k}: saved {saved.get(k)!r}, this optimizer {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise ValueError(
            "Cannot load optimizer state saved by a differently configured "
            "AccumOptimizer (nothing was loaded): " + "; ".join(diffs)
        )


def ema_decay(updates_before: int, ema_momentum: float, ema_warmup: bool) -> float:
    """The EMA momentum used at an update, as a pure function of the count.

    Args:
        updates_before: int, number of updates applied before this one.
        ema_momentum: float in [0, 1], the configured momentum.
        ema_warmup: bool, whether to use `min(m, (1 + n) / (10 + n))`.

    Returns:
        The momentum `m` of `ema = m * ema + (1 - m) * w`: 0 at the first
        update (the shadow is a copy), then `ema_momentum`, or with warm-up
        `min(ema_momentum, (1 + n) / (10 + n))` with `n = updates_before`.
    """
    if updates_before <= 0:
        return 0.0
    if ema_warmup:
        return min(ema_momentum, (1.0 + updates_before) / (10.0 + updates_before))
    return ema_momentum
