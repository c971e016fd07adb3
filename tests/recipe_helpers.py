"""Helpers shared by tests/test_recipe*.py and tests/test_ops*.py."""
import numpy as np

from conftest import fixture, load_keras_model
import surgeon
from surgeon.recipe.execute import apply
from surgeon.recipe import recipe


def run(tmp_path, ops, input="cnn_adam.keras", name="out.keras", **kw):
    """Apply ``ops`` to a fixture; returns (plan, output path)."""
    out = tmp_path / name
    rec = recipe(input=str(fixture(input)), output=str(out), ops=ops, **kw)
    plan, _ = apply(rec, hash_inputs=False)
    return plan, out


def read_all(path, model=None):
    with surgeon.open_checkpoint(path, model=model) as r:
        return {e.name: r.read(e.name) for e in r.entries()}


def keras_slot(model, param, slot):
    """The Keras optimizer variable holding ``param``'s ``slot`` (by Keras' own path)."""
    layer, var = param.split("/")[-2:]
    want = f"{layer}_{var}_{slot}"
    found = [v for v in model.optimizer.variables if v.path.split("/")[-1] == want]
    assert len(found) == 1, (want, [v.path for v in model.optimizer.variables])
    return found[0].numpy()


def batch_for(model):
    shape = model.inputs[0].shape
    rs = np.random.RandomState(0)
    if model.inputs[0].dtype == "int32":
        x = rs.randint(0, 30, size=(4,) + tuple(shape[1:])).astype("int32")
    else:
        x = rs.standard_normal((4,) + tuple(shape[1:])).astype("float32")
    out = model.outputs[0].shape[-1]
    if model.loss == "sparse_categorical_crossentropy":
        y = rs.randint(0, out, size=(4,)).astype("int32")
    else:
        y = rs.standard_normal((4, out)).astype("float32")
    return x, y


def keras_loads_and_trains(path, weights_of=None):
    """Keras loads ``path`` with no warning and trains one more step from it."""
    model = load_keras_model(path, weights_of=weights_of)
    before = int(model.optimizer.iterations.numpy())
    x, y = batch_for(model)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    assert int(model.optimizer.iterations.numpy()) == before + 1
    return model
