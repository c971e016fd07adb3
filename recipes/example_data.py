"""Example ``--data`` functions for ``surgeon resume`` on the shipped fixtures.

Each returns batched ``tf.data.Dataset`` s (or ``(x, y)`` arrays) with a fixed order, so a
run that is interrupted and resumed sees the same batches as one that is not.

    surgeon resume fixtures/cnn_adam.keras --data recipes/example_data.py:cnn_data \
        --steps 20 -o /tmp/cnn_adam_more.keras
"""
import numpy as np

BATCH = 4


def _arrays(kind, n=64, seed=1234):
    rs = np.random.RandomState(seed)
    if kind == "cnn":
        return (rs.standard_normal((n, 8, 8, 3)).astype("float32"),
                rs.randint(0, 3, size=(n,)).astype("int32"))
    if kind == "lstm":
        return (rs.randint(0, 30, size=(n, 7)).astype("int32"),
                rs.standard_normal((n, 2)).astype("float32"))
    return (rs.standard_normal((n, 6)).astype("float32"),
            rs.standard_normal((n, 2)).astype("float32"))


def _dataset(kind, seed=None):
    import tensorflow as tf
    ds = tf.data.Dataset.from_tensor_slices(_arrays(kind))
    if seed is not None:  # reshuffled every epoch, but the same sequence for a given seed
        ds = ds.shuffle(64, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(BATCH, drop_remainder=True)


def cnn_data(seed=None):
    """Images 8x8x3 and 3-class labels for fixtures/cnn_*.keras."""
    return _dataset("cnn", seed)


def lstm_data(seed=None):
    """Token sequences and regression targets for fixtures/lstm_*.keras."""
    return _dataset("lstm", seed)


def nested_data(seed=None):
    """Feature vectors and regression targets for fixtures/nested_*.keras."""
    return _dataset("nested", seed)


def nested_arrays():
    """The same as ``nested_data`` as numpy arrays (pass --batch-size)."""
    return _arrays("nested")
