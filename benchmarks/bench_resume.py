#!/usr/bin/env python
"""Benchmark: surgeon's resume loop vs model.fit, and RecipeCallback overhead.

Same model, same data, same batch size, measured in the same process, after a warm-up
(tracing excluded): steps/s of ``surgeon.train.resume`` vs ``model.fit``; and
``model.fit`` with ``RecipeCallback([Clip(...)], every_n_steps=1)`` vs without (and the
custom loop with the same in-step edit vs without). Several alternating repetitions;
medians are reported, with peak RSS.

    python benchmarks/bench_resume.py [--width 512] [--steps 300] [--reps 3]
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

WARM = 20


def build(width, depth=3, features=256, classes=10):
    import keras
    keras.utils.set_random_seed(0)
    inp = keras.Input((features,), name="x")
    x = inp
    for i in range(depth):
        x = keras.layers.Dense(width, activation="relu", name=f"fc{i}")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    out = keras.layers.Dense(classes, name="head")(x)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    return model


def make_data(batch, n=4096, features=256, classes=10):
    import tensorflow as tf
    rs = np.random.RandomState(0)
    x = rs.standard_normal((n, features)).astype("float32")
    y = rs.randint(0, classes, n).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)


class Timer:
    """Time from the end of step WARM to the end of the last step."""

    def __init__(self, total):
        self.total, self.t0, self.t1 = total, None, None

    def mark(self, i):
        if i == WARM:
            self.t0 = (time.perf_counter(), time.process_time())
        if i == self.total:
            self.t1 = (time.perf_counter(), time.process_time())

    @property
    def rate(self):
        """(steps per wall second, steps per CPU second of this process)."""
        n = self.total - WARM
        return n / (self.t1[0] - self.t0[0]), n / (self.t1[1] - self.t0[1])


def fit_rate(ckpt, data, steps, callbacks=()):
    import keras
    model = keras.saving.load_model(ckpt)
    timer = Timer(steps)

    class Mark(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            timer.mark(batch + 1)

    model.fit(data().repeat().take(steps), epochs=1, verbose=0, shuffle=False,
              callbacks=list(callbacks) + [Mark()])
    return timer.rate


def loop_rate(ckpt, data, steps, edits=None):
    from surgeon.train import resume
    timer = Timer(steps)
    resume(ckpt, data=data, steps=steps, skip_consumed=False, edits=edits,
           on_step=lambda i, n, loss: timer.mark(i), write=False)
    return timer.rate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    import tensorflow as tf
    from surgeon.keras import RecipeCallback
    from surgeon.train.edits import Clip

    tmp = tempfile.mkdtemp(prefix="bench-resume-")
    ckpt = os.path.join(tmp, "start.keras")
    build(args.width).save(ckpt)
    data = lambda: make_data(args.batch)  # noqa: E731
    edit = [Clip(min=-0.5, max=0.5)]
    runs = {k: [] for k in ("fit", "loop", "fit+cb", "loop+edit")}
    for _ in range(args.reps):
        runs["fit"].append(fit_rate(ckpt, data, args.steps))
        runs["loop"].append(loop_rate(ckpt, data, args.steps))
        runs["fit+cb"].append(fit_rate(ckpt, data, args.steps, [RecipeCallback(edit)]))
        runs["loop+edit"].append(loop_rate(ckpt, data, args.steps, edit))
    print(f"model: MLP 256-{args.width}x3-BN-10, Adam, batch {args.batch}, "
          f"{args.steps - WARM} timed steps after {WARM} warm-up, {args.reps} reps (median), "
          f"TF {tf.__version__}")
    for j, unit in enumerate(("wall", "CPU")):
        med = {k: statistics.median(r[j] for r in v) for k, v in runs.items()}
        print(f"steps per {unit} second:")
        for k, v in med.items():
            print(f"  {k:10s} {v:8.1f}   (runs: {', '.join(f'{r[j]:.1f}' for r in runs[k])})")
        print(f"  resume loop / model.fit        = {med['loop'] / med['fit']:.3f}x  (target >= 0.95)")
        print(f"  RecipeCallback every step cost = {100 * (1 - med['fit+cb'] / med['fit']):.1f}%  "
              "(target <= 10%)")
        print(f"  in-loop edit every step cost   = {100 * (1 - med['loop+edit'] / med['loop']):.1f}%")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
