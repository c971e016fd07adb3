"""Slot policies (keep / reset / follow / warm) on every optimizer kind, Keras as the oracle.

Small models are trained a few steps by Keras with Adam(amsgrad), Adagrad,
RMSprop(centered, momentum) and SGD(momentum) and saved by Keras. After the op, Keras
loads the result (no warning allowed) and every optimizer variable, found by Keras' own
path, is compared with what numpy computes from the input *as Keras loaded it*: nothing
here reads through surgeon's binding.
"""
import numpy as np
import pytest

from conftest import load_keras_model
from surgeon.recipe.execute import apply
from surgeon.recipe import recipe, rescale, zero

OPTIMIZERS = {
    "adam_amsgrad": ("Adam", {"learning_rate": 0.01, "amsgrad": True}),
    "adagrad": ("Adagrad", {"learning_rate": 0.05}),
    "rmsprop_centered": ("RMSprop", {"learning_rate": 0.01, "momentum": 0.9, "centered": True}),
    "sgd_momentum": ("SGD", {"learning_rate": 0.05, "momentum": 0.9}),
}
# Keras' slot variable names; squared-gradient statistics scale with c**2 when w scales with c
SLOT_POWER = {"momentum": 1, "velocity": 2, "velocity_hat": 2, "accumulator": 2, "average_gradient": 1}
TARGET = "d1/kernel"
FACTOR = 0.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """optimizer key -> a .keras file saved by Keras after 3 training steps."""
    import keras
    d = tmp_path_factory.mktemp("slot_policies")
    out = {}
    for key, (cls, kw) in OPTIMIZERS.items():
        keras.utils.set_random_seed(0)
        inp = keras.Input((5,), name="x")
        h = keras.layers.Dense(4, activation="tanh", name="d1")(inp)
        h = keras.layers.Dense(3, name="d2")(h)
        model = keras.Model(inp, h)
        model.compile(getattr(keras.optimizers, cls)(**kw), "mse")
        rs = np.random.RandomState(0)
        model.fit(rs.randn(12, 5), rs.randn(12, 3), batch_size=4, epochs=1, verbose=0, shuffle=False)
        out[key] = d / f"{key}.keras"
        model.save(out[key])
    return out


def _slot_table(model):
    """optimizer variable path -> (param path, Keras slot name) from Keras' own names."""
    params = {v.path.replace("/", "_"): v.path for v in model.trainable_variables}
    out = {}
    for v in model.optimizer.variables:
        if v.name in ("iteration", "learning_rate"):
            continue
        hits = [(p, s) for s in SLOT_POWER for stem, p in params.items() if v.name == f"{stem}_{s}"]
        assert len(hits) == 1, f"cannot classify optimizer variable {v.path}: {hits}"
        out[v.path] = hits[0]
    return out


def _expected_slot(policy, slot, old):
    if policy == "keep":
        return old
    if policy == "reset":
        return np.zeros_like(old)
    if policy == "follow":
        return old * FACTOR ** SLOT_POWER[slot]
    assert policy == "warm"  # first moments restart, second moments start at their mean
    return np.full_like(old, old.astype(np.float64).mean()) if SLOT_POWER[slot] == 2 else np.zeros_like(old)


CASES = [(o, p) for o in OPTIMIZERS for p in ("keep", "reset", "follow", "warm")]


@pytest.mark.parametrize("opt,policy", CASES, ids=[f"{o}-{p}" for o, p in CASES])
def test_slot_policy_against_keras(trained, tmp_path, opt, policy):
    src = trained[opt]
    out = tmp_path / "out.keras"
    op = zero(TARGET, slots="warm") if policy == "warm" else rescale(TARGET, factor=FACTOR, slots=policy)
    apply(recipe(input=str(src), output=str(out), ops=[op]), hash_inputs=False)
    a, b = load_keras_model(src), load_keras_model(out)
    want_w = {v.path: v.numpy() for v in a.weights}
    want_w[TARGET] = want_w[TARGET] * (0.0 if policy == "warm" else FACTOR)
    got_w = {v.path: v.numpy() for v in b.weights}
    assert got_w.keys() == want_w.keys()
    for k, v in want_w.items():
        np.testing.assert_allclose(got_w[k], v, rtol=1e-6, err_msg=k)
    table = _slot_table(a)
    kinds = {s for p, s in table.values() if p == TARGET}
    assert kinds == {"adam_amsgrad": {"momentum", "velocity", "velocity_hat"}, "adagrad": {"accumulator"},
                     "rmsprop_centered": {"velocity", "momentum", "average_gradient"},
                     "sgd_momentum": {"momentum"}}[opt]
    old = {v.path: v.numpy() for v in a.optimizer.variables}
    got = {v.path: v.numpy() for v in b.optimizer.variables}
    assert got.keys() == old.keys()
    for path, value in old.items():
        param, slot = table.get(path, (None, None))
        want = _expected_slot(policy, slot, value) if param == TARGET else value
        if param == TARGET and policy != "keep":
            assert not np.array_equal(want, value), f"{path}: the policy cannot be told from keep"
        np.testing.assert_allclose(got[path], want, rtol=1e-6, atol=0, err_msg=f"{opt} {policy} {path}")
    assert int(b.optimizer.iterations.numpy()) == int(a.optimizer.iterations.numpy()) == 3
