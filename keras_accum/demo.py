"""The main job: accumulation on small batches equals training on large batches.

Run it with `keras-accum-demo` (or `python -m keras_accum.demo`), and with
`--framework torch` for the PyTorch mirror. It trains the same small model,
from the same initial weights, on data made with NumPy (nothing is
downloaded): once with `AccumOptimizer(merge_grad=4)` on batches of 8, once
with the plain optimizer on batches of 32, with the same learning-rate
schedule, EMA and clipping, and prints both losses and the largest weight
difference. The Keras run also trains with Keras's built-in
`gradient_accumulation_steps` for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

_LR, _DECAY_STEPS = 3e-3, 200
_EMA_MOMENTUM, _CLIP = 0.9, 1.0
# A small epsilon: Keras and torch place Adam's epsilon differently, and a
# small one lets the two frameworks print the same digits.
_EPS = 1e-10


@contextlib.contextmanager
def _quiet_stderr():
    """Sends file descriptor 2 to /dev/null while TensorFlow starts.

    TensorFlow's C++ runtime logs CUDA probing and CPU-feature lines when it
    loads, some of them before `TF_CPP_MIN_LOG_LEVEL` is read. A Python
    error raised meanwhile still shows: it is printed after the `finally`.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (some notebooks, IDEs)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_keras_quietly():
    """Imports Keras (and TensorFlow, on its backend) without start-up log lines.

    For the demo and the notebooks: `TF_CPP_MIN_LOG_LEVEL=3` (unless set), and
    standard error silenced while the backend loads and probes its devices.
    Errors still show. Returns `(keras, tf)`, `tf` None on the JAX and torch
    backends (`KERAS_BACKEND`).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = None
    with _quiet_stderr():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.get_logger().setLevel("ERROR")
            tf.config.list_logical_devices()  # the device probe logs too
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    return keras, tf


def _data(n, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 10)).astype("float32")
    w = rng.normal(size=(10, 1)).astype("float32")
    y = (np.tanh(x @ w) + 0.05 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def _initial_weights(seed, sizes=(10, 32, 1)):
    """Glorot-uniform kernels and zero biases (Keras's Dense defaults), in NumPy.

    Both frameworks start from these arrays, so the Keras and the torch demo
    print the same numbers.
    """
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        weights.append(rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype("float32"))
        weights.append(np.zeros((fan_out,), dtype="float32"))
    return weights


def _cosine(step):
    """Keras's `CosineDecay(_LR, _DECAY_STEPS)` as a factor of `_LR`."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, _DECAY_STEPS) / _DECAY_STEPS))


# ----------------------------------------------------------------------- Keras
def _keras_runs(args):
    import numpy as np

    keras, _ = import_keras_quietly()

    from keras_accum import AccumOptimizer

    x, y = _data(args.samples, args.seed)
    k, b = args.merge_grad, args.micro_batch
    common = dict(use_ema=True, ema_momentum=_EMA_MOMENTUM, global_clipnorm=_CLIP)

    class UpdateNorms(keras.callbacks.Callback):
        """Reads the merged-gradient norm after each micro-step that updated."""

        def __init__(self, opt):
            super().__init__()
            self.opt, self.updates, self.norms = opt, 0, []
            self.ema, self.ema_moves = None, [0, 0]  # at updates, at other micro-steps

        def on_train_batch_end(self, batch, logs=None):
            _ = self.model  # JAX: puts the trainer's state back into the variables first
            updated = int(self.opt.iterations) > self.updates
            if updated:
                self.updates = int(self.opt.iterations)
                self.norms.append(float(self.opt.last_grad_norm))
            ema = [keras.ops.convert_to_numpy(v) for v in self.opt.ema_variables]
            if self.ema is not None:
                moved = any(not np.array_equal(a, b) for a, b in zip(ema, self.ema))
                self.ema_moves[0 if updated else 1] += moved
            self.ema = ema

    def train(kind):
        keras.utils.set_random_seed(args.seed)
        model = keras.Sequential(
            [
                keras.Input((x.shape[1],)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        model.set_weights(_initial_weights(args.seed))
        schedule = keras.optimizers.schedules.CosineDecay(_LR, decay_steps=_DECAY_STEPS)
        callbacks = []
        if kind == "accum":
            opt = AccumOptimizer(keras.optimizers.Adam(schedule, epsilon=_EPS), merge_grad=k, **common)
            callbacks.append(UpdateNorms(opt))
        elif kind == "builtin":  # Keras's own accumulation, for comparison
            opt = keras.optimizers.Adam(
                schedule, epsilon=_EPS, gradient_accumulation_steps=k, **common
            )
        else:
            opt = keras.optimizers.Adam(schedule, epsilon=_EPS, **common)
        model.compile(optimizer=opt, loss="mse")
        history = model.fit(
            x,
            y,
            batch_size=b if kind != "large" else k * b,
            epochs=args.epochs,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        norms = callbacks[0].norms if callbacks else []
        ema_moves = callbacks[0].ema_moves if callbacks else None
        return model.get_weights(), history.history["loss"], opt, norms, ema_moves

    accum_w, accum_loss, opt, norms, ema_moves = train("accum")
    large_w, large_loss, large_opt, _, _ = train("large")
    builtin_w = train("builtin")[0] if not args.no_builtin else None
    return dict(
        framework=f"Keras {keras.__version__} ({keras.backend.backend()} backend)",
        accum=(accum_w, accum_loss),
        large=(large_w, large_loss),
        builtin=builtin_w,
        updates=int(opt.iterations),
        micro_steps=int(opt.micro_steps),
        large_updates=int(large_opt.iterations),
        skipped=int(opt.skipped_updates),
        norms=norms,
        ema_moves=ema_moves,
    )


# ----------------------------------------------------------------------- torch
def _torch_runs(args):
    import numpy as np
    import torch

    from keras_accum.torch import AccumOptimizer

    torch.manual_seed(args.seed)
    x, y = (torch.from_numpy(a) for a in _data(args.samples, args.seed))
    k, b = args.merge_grad, args.micro_batch

    def model_from_keras_weights():
        model = torch.nn.Sequential(
            torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
        )
        k1, b1, k2, b2 = _initial_weights(args.seed)
        with torch.no_grad():
            for layer, kernel, bias in ((model[0], k1, b1), (model[2], k2, b2)):
                layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
                layer.bias.copy_(torch.from_numpy(bias))
        return model

    def adam(model):
        return torch.optim.Adam(model.parameters(), lr=_LR, eps=_EPS)

    loss_fn = torch.nn.MSELoss()

    # keras_accum: the plain torch loop, once per micro-batch of b.
    model = model_from_keras_weights()
    opt = AccumOptimizer(
        adam(model), merge_grad=k, use_ema=True, ema_momentum=_EMA_MOMENTUM,
        global_clipnorm=_CLIP,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine)
    accum_loss, norms = [], []
    ema_moves, ema_before = [0, 0], None  # EMA changes at updates, at other micro-steps
    for _ in range(args.epochs):
        losses = []
        for i in range(0, len(x), b):
            loss = loss_fn(model(x[i : i + b]), y[i : i + b])
            loss.backward()
            updates = opt.next_step_updates
            opt.step()
            sched.step()  # advances once per update
            opt.zero_grad()
            if updates:
                norms.append(float(opt.last_grad_norm))
            ema = [opt.state[p]["ema"].clone() for p in model.parameters() if "ema" in opt.state[p]]
            if ema_before is not None:  # the first update creates the EMA: a move
                moved = len(ema) != len(ema_before) or any(
                    not torch.equal(a, c) for a, c in zip(ema, ema_before)
                )
                ema_moves[0 if updates else 1] += moved
            ema_before = ema
            losses.append(loss.detach().item())
        accum_loss.append(float(np.mean(losses)))
    opt.finalize_variable_values()  # the EMA into the model, as Keras's fit does

    # The large-batch run: plain Adam on batches of k * b, with the same
    # schedule, clipping (Keras's form) and EMA written out by hand.
    large = model_from_keras_weights()
    large_opt = adam(large)
    large_sched = torch.optim.lr_scheduler.LambdaLR(large_opt, _cosine)
    params = list(large.parameters())
    ema = None
    large_loss, large_updates = [], 0
    for _ in range(args.epochs):
        losses = []
        for i in range(0, len(x), k * b):
            loss = loss_fn(large(x[i : i + k * b]), y[i : i + k * b])
            loss.backward()
            with torch.no_grad():
                total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
                for p in params:
                    p.grad.mul_(_CLIP / torch.clamp(total, min=_CLIP))
            large_opt.step()
            large_sched.step()
            large_opt.zero_grad()
            large_updates += 1
            with torch.no_grad():
                if ema is None:
                    ema = [p.detach().clone() for p in params]
                else:
                    for e, p in zip(ema, params):
                        e.lerp_(p, 1.0 - _EMA_MOMENTUM)
            losses.append(loss.detach().item())
        large_loss.append(float(np.mean(losses)))
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)

    def weights(m):
        return [p.detach().numpy().copy() for p in m.parameters()]

    return dict(
        framework=f"PyTorch {torch.__version__}",
        accum=(weights(model), accum_loss),
        large=(weights(large), large_loss),
        builtin=None,
        updates=opt.iterations,
        micro_steps=opt.micro_steps,
        large_updates=large_updates,
        skipped=opt.skipped_updates,
        norms=norms,
        ema_moves=ema_moves,
    )


# ------------------------------------------------------------------------ main
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults after each option's help; the epilog's lines kept as written."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-accum-demo",
        description=(
            "Trains one small model twice from the same initial weights on the same "
            "data (made with NumPy, nothing downloaded): with AccumOptimizer(merge_grad=K) "
            "on micro-batches of B, and with the plain optimizer on batches of K*B, both "
            "with Adam, a cosine learning-rate schedule, an EMA of the weights and "
            "global_clipnorm=1. It prints both losses per epoch and the largest weight "
            "difference, and exits 0 when they match (difference < 1e-4), 1 when not. "
            "With --framework keras it also trains with Keras's built-in "
            "gradient_accumulation_steps=K, for comparison."
        ),
        epilog=(
            "examples:\n"
            "  keras-accum-demo\n"
            "  keras-accum-demo --framework torch\n"
            "  keras-accum-demo --merge-grad 8 --micro-batch 4 --epochs 2\n\n"
            "TensorFlow's start-up log lines are silenced (TF_CPP_MIN_LOG_LEVEL=3 unless set)."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--framework", choices=("keras", "torch"), default="keras",
        help="keras: keras_accum.AccumOptimizer with Keras 3 (model.fit); torch: "
        "keras_accum.torch.AccumOptimizer in a plain PyTorch loop (needs torch)",
    )
    parser.add_argument(
        "--merge-grad", type=int, default=4, metavar="K",
        help="micro-batches merged into one update (AccumOptimizer's merge_grad)",
    )
    parser.add_argument(
        "--micro-batch", type=int, default=8, metavar="B",
        help="samples per micro-batch; the large-batch run uses K*B",
    )
    parser.add_argument("--epochs", type=int, default=5, help="passes over the data")
    parser.add_argument(
        "--samples", type=int, default=512, metavar="N",
        help="training samples (10 features, one target); a multiple of K*B keeps "
        "every window full",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data and the initial weights"
    )
    parser.add_argument(
        "--no-builtin", action="store_true",
        help="skip the run with Keras's built-in gradient_accumulation_steps "
        "(--framework keras only)",
    )
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.framework == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            print(
                "keras-accum-demo --framework torch needs PyTorch. Install the build for "
                "your machine first, then the extra:\n"
                "  CPU only:   pip install torch --index-url "
                "https://download.pytorch.org/whl/cpu\n"
                "  a GPU:      the command for your CUDA version from "
                "https://pytorch.org/get-started/locally/\n"
                '  then:       pip install "keras_accum[torch]"\n'
                "(A plain `pip install torch` with no torch installed brings, on Linux, "
                "the CUDA build: several GB.)",
                file=sys.stderr,
            )
            return 2
    k, b = args.merge_grad, args.micro_batch
    print(
        f"keras_accum demo ({args.framework}): AccumOptimizer(merge_grad={k}) on batches of "
        f"{b} vs the plain optimizer on batches of {k * b}",
        flush=True,
    )
    print(
        f"Same data and initial weights; Adam(epsilon={_EPS:g}), CosineDecay({_LR:g}, "
        f"{_DECAY_STEPS}), "
        f"EMA (momentum {_EMA_MOMENTUM}), global_clipnorm={_CLIP}.",
        flush=True,
    )

    import numpy as np

    r = _torch_runs(args) if args.framework == "torch" else _keras_runs(args)
    (accum_w, accum_loss), (large_w, large_loss) = r["accum"], r["large"]

    def max_diff(ws):
        return max(float(np.max(np.abs(p - q))) for p, q in zip(ws, large_w))

    print(f"\n{r['framework']}: mean training loss per epoch")
    print(f"epoch   accumulated, batches of {b:<3d}   large batch of {k * b}")
    for epoch, (a, c) in enumerate(zip(accum_loss, large_loss), start=1):
        print(f"{epoch:5d}   {a:24.6f}   {c:17.6f}")
    print(
        f"\nupdates: {r['updates']} from {r['micro_steps']} micro-steps "
        f"(large batch: {r['large_updates']} updates)"
    )
    diff = max_diff(accum_w)
    print(f"largest weight difference, accumulated vs large batch: {diff:.3g} (float32 round-off)")
    if r["builtin"] is not None:
        print(
            f"largest weight difference, Keras's built-in gradient_accumulation_steps={k} "
            f"vs large batch: {max_diff(r['builtin']):.3g}\n"
            f"  (not round-off: the built-in feeds the schedule the micro-step count, so the "
            f"cosine decays {k}x too fast,\n   and moves the EMA on every micro-step. Its "
            f"clipping is not the cause: on one device it clips the merged mean once\n   per "
            f"update, as AccumOptimizer does)"
        )
    norms = r["norms"]
    clipped = sum(n > _CLIP for n in norms)
    at_updates, between = r["ema_moves"]
    print(
        f"\nEMA:      moved at {at_updates} of the {r['updates']} updates and at {between} of "
        f"the {r['micro_steps'] - r['updates']} micro-steps between (the first update "
        f"copies the weights); written into the model at the end (the weights compared "
        f"above)."
    )
    print(
        f"Clipping: global_clipnorm={_CLIP} scaled down {clipped} of {len(norms)} merged "
        f"gradients (norms {min(norms):.3g} to {max(norms):.3g}), once per update."
    )
    print(
        f"Skip:     on_nonfinite='skip' discarded {r['skipped']} windows (no inf or NaN "
        "in this run; a window with one is dropped whole)."
    )
    ok = diff < 1e-4
    print(
        "\nMATCH: accumulation reproduces large-batch training"
        if ok
        else "\nMISMATCH: accumulation does not reproduce large-batch training"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
