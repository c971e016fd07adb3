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


def xy():
    """The zoo's training data, as a ``--data`` function."""
    return X, Y


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


def _classes():
    """The zoo's own Keras classes, registered (as ``keras.saving.load_model`` requires)."""
    import keras

    @keras.saving.register_keras_serializable(package="surgeon_zoo")
    class Gate(keras.layers.Layer):
        """A custom layer: a trainable add_weight and a non-trainable counter."""

        def build(self, shape):
            self.w = self.add_weight(name="gate_w", shape=(shape[-1],), initializer="ones")
            self.seen = self.add_weight(name="seen", shape=(), initializer="zeros",
                                        trainable=False)

        def call(self, x):
            self.seen.assign_add(1.0)
            return x * self.w

    @keras.saving.register_keras_serializable(package="surgeon_zoo")
    class Sub(keras.Model):
        """A subclassed model: layers held by attributes, a frozen layer, and the model's
        own add_weight variables (one trainable, one not)."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.body = keras.layers.Dense(3, name="body")
            self.gate = Gate(name="gate")
            self.head = keras.layers.Dense(2, name="head")
            self.frozen = keras.layers.Dense(2, name="frozen")
            self.frozen.trainable = False
            self.scale = self.add_weight(name="scale", shape=(2,), initializer="ones")
            self.calls = self.add_weight(name="calls", shape=(), initializer="zeros",
                                         trainable=False)

        def call(self, x):
            h = self.gate(self.body(x))
            self.calls.assign_add(1.0)
            return self.head(h) * self.scale + self.frozen(h)

    return Sub


def subclassed():
    import keras
    return _fit(_classes()(name="sub"), keras.optimizers.Adam(0.01))


def nested():
    """A Functional model holding a nested Functional and a nested Sequential."""
    import keras
    inp = keras.Input((4,), name="bx")
    inner = keras.Model(inp, keras.layers.Dense(3, name="inner_a")(inp), name="backbone")
    seq = keras.Sequential([keras.layers.Dense(3, name="s1"),
                            keras.layers.Dense(2, name="s2")], name="tail")
    x = keras.Input((4,), name="x")
    out = keras.layers.Dense(2, name="fc")(inner(x)) + seq(inner(x))
    return _fit(keras.Model(x, out, name="outer"), keras.optimizers.Adam(0.01))


def sequential():
    import keras
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc1"),
                          keras.layers.Dense(2, name="fc2")], name="seq")
    return _fit(m, keras.optimizers.SGD(0.1, momentum=0.9))


def plain():
    import keras
    return _fit(_mlp(), keras.optimizers.Adam(0.01))


BUILDERS = {f.__name__: f for f in (int8, int4, mixed, ema, accum, adafactor, nadam, lora,
                                     norm, text, subclassed, nested, sequential, plain)}


def save(model, directory, name):
    """``.keras``, ``.weights.h5`` and a TF checkpoint of ``model``; returns the dir."""
    import tensorflow as tf
    model.save(directory / f"{name}.keras")
    model.save_weights(directory / f"{name}.weights.h5")
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
        str(directory / f"{name}_ckpt" / "ckpt"))
    return directory


def save_more(model, directory, name):
    """The other formats Keras writes: sharded weights, legacy ``.h5`` (where Keras accepts
    the model), a SavedModel; returns {format: path or None when Keras refuses it}."""
    import tensorflow as tf
    out = {}
    model.save_weights(directory / f"{name}_sharded.weights.json", max_shard_size=0.0002)
    out["sharded"] = directory / f"{name}_sharded.weights.json"
    try:
        model.save(directory / f"{name}.h5")
        out["legacy"] = directory / f"{name}.h5"
    except (NotImplementedError, ValueError, TypeError):  # Keras: no legacy .h5 for it
        (directory / f"{name}.h5").unlink(missing_ok=True)
        out["legacy"] = None
    tf.saved_model.save(model, str(directory / f"{name}_saved"))
    out["saved"] = directory / f"{name}_saved"
    return out


# -- Keras as the oracle ------------------------------------------------------------------

def keras_names(model):
    """id(variable) -> canonical name, from Keras' own variable paths: the top model's
    name left out, a nested model's weights prefixed by its layer name (Keras 3 paths of a
    nested Functional omit it)."""
    import keras
    out = {}
    top = model.name + "/"

    def visit(layer, prefix):
        for sub in getattr(layer, "layers", []):
            if isinstance(sub, keras.Model):
                visit(sub, prefix + sub.name + "/")
        for v in layer.weights:
            if id(v) in out:
                continue
            path = v.path[len(top):] if v.path.startswith(top) else v.path
            out[id(v)] = path if path.startswith(prefix) else prefix + path

    visit(model, "")
    return out


def keras_truth(model):
    """(roles, values, slots) from Keras: canonical name -> 'param' | 'frozen' | 'state'
    (the layer's own trainable/non-trainable lists, which Keras saves), -> value; slot
    name ``optimizer/<param>/<slot>`` -> value (Keras names a slot after its param's
    path, ``adam/<path with _>_<slot>``)."""
    names = keras_names(model)
    trainable = {id(v) for v in model.trainable_variables}
    created = {id(v) for layer in [model] + list(model._flatten_layers())
               for v in layer._trainable_variables}
    roles, values = {}, {}
    for v in model.variables:
        n = names[id(v)]
        roles[n] = "param" if id(v) in trainable else "frozen" if id(v) in created else "state"
        values[n] = np.asarray(v)
    slots = {}
    opt = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    for v in opt.variables:
        leaf = v.path.split("/")[-1]
        for p in model.trainable_variables:
            stem = p.path.replace("/", "_") + "_"
            if leaf.startswith(stem) and leaf[len(stem):].isidentifier():
                slots[f"optimizer/{names[id(p)]}/{leaf[len(stem):]}"] = np.asarray(v)
    return roles, values, slots
