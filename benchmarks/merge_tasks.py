"""Two fine-tunes of one tiny base on two tasks, merged: the README "Merging" table.

Data: scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``, shipped inside
the package, no download). Base: an MLP (64 -> 32 relu -> BatchNorm -> 10) trained briefly
on a few hundred digits of every class. Task A: digits 0-4; task B: digits 5-9. Each
fine-tune trains the base with Adam on its task only (and forgets the other). Scores: 10-way
accuracy on the held-out digits of each task. Every merge is done by ``surgeon merge`` on
the saved ``.keras`` files and scored after ``keras.saving.load_model``.

    python benchmarks/merge_tasks.py            # prints the markdown table
    python benchmarks/merge_tasks.py --out benchmarks/results/merge_tasks.md

``tests/test_merge.py`` builds the same models with ``make_models``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402

TASKS = {"A (digits 0-4)": (0, 5), "B (digits 5-9)": (5, 10)}


def data():
    """(x_train, y_train, x_test, y_test) of the digits, a fixed split."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.data / 16.0).astype("float32")
    y = d.target.astype("int64")
    idx = np.random.default_rng(0).permutation(len(x))
    cut = int(0.7 * len(x))
    tr, te = idx[:cut], idx[cut:]
    return x[tr], y[tr], x[te], y[te]


def _task(x, y, lo, hi):
    m = (y >= lo) & (y < hi)
    return x[m], y[m]


def _build(keras):
    inp = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(32, activation="relu", name="fc1")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    out = keras.layers.Dense(10, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name="digits")


def make_models(directory, seed=0):
    """Train and save ``base.keras``, ``ft_a.keras``, ``ft_b.keras`` (and ``ft_b_ckpt/ckpt``,
    a TF checkpoint of ft_b) in ``directory``; returns {name: path}."""
    import keras
    import tensorflow as tf
    directory = Path(directory)
    xtr, ytr, _, _ = data()
    keras.utils.set_random_seed(seed)
    base = _build(keras)
    base.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    base.fit(xtr[:300], ytr[:300], batch_size=32, epochs=2, verbose=0, shuffle=False)
    paths = {"base": directory / "base.keras"}
    base.save(paths["base"])
    for name, (lo, hi) in zip(("ft_a", "ft_b"), TASKS.values()):
        keras.utils.set_random_seed(seed + 1)
        m = keras.saving.load_model(paths["base"])
        x, y = _task(xtr, ytr, lo, hi)
        m.fit(x, y, batch_size=64, epochs=3, verbose=0, shuffle=False)
        paths[name] = directory / f"{name}.keras"
        m.save(paths[name])
        if name == "ft_b":
            tf.train.Checkpoint(model=m, optimizer=m.optimizer).write(
                str(directory / "ft_b_ckpt" / "ckpt"))
            paths["ft_b_ckpt"] = directory / "ft_b_ckpt"
    return paths


def scores(path) -> dict:
    """{task: accuracy} of the model saved at ``path`` on each task's held-out digits."""
    import keras
    model = keras.saving.load_model(path)
    _, _, xte, yte = data()
    out = {}
    for task, (lo, hi) in TASKS.items():
        x, y = _task(xte, yte, lo, hi)
        pred = np.argmax(np.asarray(model(x, training=False)), axis=1)
        out[task] = float(np.mean(pred == y))
    return out


MERGES = [  # (label, surgeon merge arguments after the models)
    ("linear (mean)", ["--method", "linear"]),
    ("task_arithmetic λ=1", ["--method", "task_arithmetic", "--scale", "1.0"]),
    ("ties density=0.5", ["--method", "ties", "--density", "0.5"]),
    ("dare p=0.3, ties, seed 0", ["--method", "dare", "--p", "0.3", "--combine", "ties"]),
    ("slerp t=0.5", ["--method", "slerp", "--t", "0.5"]),
    ("model_stock", ["--method", "model_stock"]),
]
NO_BASE = ("linear", "slerp")


def merged(paths, args, out):
    from surgeon.cli import main
    from click.testing import CliRunner
    base = [] if args[1] in NO_BASE else ["--base", str(paths["base"])]
    res = CliRunner().invoke(main, ["merge", *base, str(paths["ft_a"]), str(paths["ft_b"]),
                                    *args, "-o", str(out)], catch_exceptions=False)
    if res.exit_code:
        raise SystemExit(res.output)
    return out


def table(directory) -> str:
    paths = make_models(directory)
    rows = [("base", scores(paths["base"])), ("fine-tune A", scores(paths["ft_a"])),
            ("fine-tune B", scores(paths["ft_b"]))]
    for i, (label, args) in enumerate(MERGES):
        rows.append((f"merged: {label}", scores(merged(paths, args, Path(directory) / f"m{i}.keras"))))
    head = "| model | " + " | ".join(f"task {t}" for t in TASKS) + " | mean |"
    lines = [head, "|---|" + "---:|" * (len(TASKS) + 1)]
    for label, s in rows:
        vals = [s[t] for t in TASKS]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + f" | {np.mean(vals):.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    with tempfile.TemporaryDirectory() as d:
        text = table(d)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
