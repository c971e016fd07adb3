"""A zoo of tiny modern Keras 3 models (quantized, mixed precision, preprocessing, optimizer
features), each trained a few steps with its optimizer and saved by Keras itself.

Built on demand into a session temp dir (see ``zoo`` in test_modern_keras.py); nothing is
committed. Every builder returns the trained model; ``save`` writes ``<name>.keras``,
``<name>.weights.h5`` and a TF checkpoint ``<name>_ckpt/ckpt``.
"""
from __future__ import annotations

import numpy as np

RNG = np.random.default_rng(0)
X = RNG.random((16, 4)).astype("float32")
Y = RNG.random((16, 2)).astype("float32")


def _mlp(name="mlp"):
    import keras
    inp = keras.Input((4,), name="x")
    h = keras.layers.Dense(3, name="fc1")(inp)
    return keras.Model(inp, keras.layers.Dense(2, name="fc2")(h), name=name)


def _fit(model, opt, x=X, y=Y, batch_size=8, epochs=1):
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=False)
    return model


def int8():
    import keras
    m = _fit(_mlp(), keras.optimizers.Adam(0.01))
    m.quantize("int8")
    return _fit(m, keras.optimizers.Adam(0.01))


def int4():
    import keras
    m = _mlp()
    m.quantize("int4")
    return _fit(m, keras.optimizers.Adam(0.01))


def mixed():
    import keras
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        m = _mlp()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return _fit(m, keras.optimizers.Adam(0.01), epochs=2)


def ema():
    import keras
    return _fit(_mlp(), keras.optimizers.Adam(0.01, use_ema=True))


def accum():
    import keras
    return _fit(_mlp(), keras.optimizers.Adam(0.01, gradient_accumulation_steps=2), batch_size=4)


def adafactor():
    import keras
    return _fit(_mlp(), keras.optimizers.Adafactor(0.01))


def nadam():
    import keras
    return _fit(_mlp(), keras.optimizers.Nadam(0.01))


def lora():
    import keras
    m = _mlp()
    m.get_layer("fc1").enable_lora(2)
    return _fit(m, keras.optimizers.Adam(0.01))


def norm():
    import keras
    inp = keras.Input((4,), name="x")
    n = keras.layers.Normalization(name="norm")
    n.adapt(X * 5.0 + 3.0)
    out = keras.layers.Dense(2, name="fc")(n(inp))
    return _fit(keras.Model(inp, out, name="normed"), keras.optimizers.Adam(0.01))


TEXTS = np.array(["a b c", "b c d", "c d e e", "a a"])


def text():
    import keras
    tv = keras.layers.TextVectorization(max_tokens=10, output_mode="int",
                                        output_sequence_length=4, name="tv")
    tv.adapt(TEXTS)
    inp = keras.Input((1,), dtype="string", name="s")
    h = keras.layers.Embedding(10, 3, name="emb")(tv(inp))
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    m = keras.Model(inp, keras.layers.Dense(1, name="fc")(h), name="texty")
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    import tensorflow as tf
    data = tf.data.Dataset.from_tensor_slices(
        (tf.constant(TEXTS.reshape(-1, 1)), np.ones((4, 1), "float32"))).batch(2)
    m.fit(data, verbose=0)
    return m


BUILDERS = {f.__name__: f for f in (int8, int4, mixed, ema, accum, adafactor, nadam, lora,
                                     norm, text)}


def save(model, directory, name):
    """``.keras``, ``.weights.h5`` and a TF checkpoint of ``model``; returns the dir."""
    import tensorflow as tf
    model.save(directory / f"{name}.keras")
    model.save_weights(directory / f"{name}.weights.h5")
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
        str(directory / f"{name}_ckpt" / "ckpt"))
    return directory
