"""The canonical tree of Keras 3 files, checked against what Keras itself reports."""
import numpy as np
import pytest

from conftest import COMBOS, fixture, keras_canonical_names, load_keras_model
from surgeon import open_checkpoint


def _keras_truth(path):
    model = load_keras_model(path)
    return model, model.trainable_variables, model.optimizer.variables


def _slot_truth(trainable, opt_vars, ours_trainable):
    """index in optimizer.variables -> (our param name, slot) using Keras' own var names."""
    truth = {}
    for i, ov in enumerate(opt_vars):
        for kv, our in zip(trainable, ours_trainable):
            prefix = kv.path.replace("/", "_") + "_"
            if ov.name.startswith(prefix) or ov.path.split("/", 1)[-1].startswith(prefix):
                slot = ov.name[len(prefix):]
                truth[i] = (our, slot)
    return truth


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("kind", ["keras", "weights+model"])
def test_params_and_slots_match_keras(combo, kind):
    path = fixture(f"{combo}.keras")
    if kind == "keras":
        ck = open_checkpoint(path)
    else:
        ck = open_checkpoint(fixture(f"{combo}.weights.h5"), model=path)
    _check_against_keras(path, ck)


def _check_against_keras(path, ck):
    model, trainable, opt_vars = _keras_truth(path)
    with ck:
        entries = ck.entries()
        meta = ck.metadata()
    params = [e for e in entries if e.role == "param" and not e.frozen]
    assert [e.shape for e in params] == [tuple(v.shape) for v in trainable]
    for e, v in zip(params, trainable):
        assert e.name.endswith(v.path), (e.name, v.path)
    nontrain = [e for e in entries if e.role == "state" or e.frozen]
    saved_nontrain = [v for v in model.non_trainable_variables if "seed_generator" not in v.path]
    assert len(nontrain) == len(saved_nontrain)  # Keras does not save RNG seed state
    assert meta["notes"] == []
    opt_entries = [e for e in entries if e.role in ("slot", "optimizer")]
    assert len(opt_entries) == len(opt_vars)
    truth = _slot_truth(trainable, opt_vars, [e.name for e in params])
    slots = [e for e in opt_entries if e.role == "slot"]
    assert len(truth) == len(slots) > 0
    for i, e in enumerate(opt_entries):
        if e.role == "optimizer":
            assert e.name.split("/")[-1] in ("iteration", "learning_rate")
            assert opt_vars[i].name == e.name.split("/")[-1]
        else:
            assert (e.slot_of, e.slot) == truth[i], (i, e)
            assert e.shape == tuple(opt_vars[i].shape)
    assert meta["optimizer"]["iterations"] == int(model.optimizer.iterations)


@pytest.mark.parametrize("combo", COMBOS)
def test_values_read_lazily_equal_keras(combo):
    path = fixture(f"{combo}.keras")
    """Every weight by its name (same-shaped tensors swapped between names must fail)."""
    model = load_keras_model(path)
    canon = keras_canonical_names(model)
    with open_checkpoint(path) as ck:
        entries = ck.entries()
        ours = {e.name: ck.read(e.name) for e in entries if e.role in ("param", "state")}
        opt = [ck.read(e.name) for e in entries if e.role in ("slot", "optimizer")]
    keras_weights = {canon[id(v)]: v.numpy() for v in model.weights if "seed_generator" not in v.path}
    assert ours.keys() == keras_weights.keys()
    for name, value in keras_weights.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert len(opt) == len(model.optimizer.variables)
    for a, v in zip(opt, model.optimizer.variables):
        np.testing.assert_array_equal(a, v.numpy(), err_msg=v.path)


def test_frozen_layer_has_no_slots():
    with open_checkpoint(fixture("cnn_adam.keras")) as ck:
        entries = ck.entries()
    frozen = [e for e in entries if e.frozen]
    assert {e.name for e in frozen} == {"frozen/kernel", "frozen/bias"}
    assert not [e for e in entries if e.slot_of in {"frozen/kernel", "frozen/bias"}]
    bn = {e.name: e.role for e in entries if e.layer == "bn" and e.role != "slot"}
    assert bn == {"bn/gamma": "param", "bn/beta": "param", "bn/moving_mean": "state",
                  "bn/moving_variance": "state"}


def test_nested_names_and_amsgrad():
    with open_checkpoint(fixture("nested_adamw.keras")) as ck:
        names = [e.name for e in ck.entries()]
    assert "backbone/fc1/kernel" in names and "optimizer/backbone/fc1/kernel/momentum" in names
    with open_checkpoint(fixture("lstm_adam.keras")) as ck:
        slots = {(e.slot_of, e.slot) for e in ck.entries() if e.role == "slot"}
    assert ("lstm/lstm_cell/recurrent_kernel", "velocity_hat") in slots
    assert ("emb/embeddings", "momentum") in slots


def test_bare_weights_without_model_binds_only_unambiguous():
    with open_checkpoint(fixture("cnn_adam.weights.h5")) as ck:
        entries, meta = ck.entries(), ck.metadata()
    with open_checkpoint(fixture("cnn_adam.keras")) as ck:
        truth = {e.key: (e.slot_of, e.slot) for e in ck.entries() if e.role == "slot"}
    bound = [e for e in entries if e.role == "slot" and e.slot_of]
    unresolved = [e for e in entries if e.role == "slot" and not e.slot_of]
    for e in bound:  # whatever is bound must be right
        assert truth[e.key] == (e.slot_of, e.slot)
    assert len(bound) + len(unresolved) == len(truth)
    if unresolved:
        assert any("--model" in n for n in meta["notes"])


def test_sharded_weights_read_like_single_file():
    with open_checkpoint(fixture("cnn_adam_sharded.weights.json"), model=fixture("cnn_adam.keras")) as a, \
            open_checkpoint(fixture("cnn_adam.weights.h5"), model=fixture("cnn_adam.keras")) as b:
        ea, eb = a.entries(), b.entries()
        assert [(e.name, e.role, e.slot_of) for e in ea] == [(e.name, e.role, e.slot_of) for e in eb]
        for e in ea:
            np.testing.assert_array_equal(a.read(e.name), b.read(e.name))


@pytest.fixture(scope="session")
def zoo_keras(tmp_path_factory, keras):
    """A model with every layer kind the tables know, trained 2 steps with Adam(amsgrad)."""
    import numpy as np
    L = keras.layers
    keras.utils.set_random_seed(1)
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    image = keras.Input((8, 8, 3), name="image")
    e = L.Embedding(20, 4, name="emb")(tokens)
    e = L.Bidirectional(L.GRU(3, return_sequences=True), name="bi")(e)
    e = L.MultiHeadAttention(2, 3, name="mha")(e, e)
    e = L.LayerNormalization(name="ln")(e)
    e = L.Conv1D(4, 2, name="c1d")(e)
    e = L.SimpleRNN(3, name="rnn")(e)
    x = L.SeparableConv2D(4, 3, name="sep")(image)
    x = L.DepthwiseConv2D(3, name="dw")(x)
    x = L.BatchNormalization(center=False, name="bn_nocenter")(x)
    x = L.Conv2DTranspose(2, 2, use_bias=False, name="deconv")(x)
    x = L.GroupNormalization(2, name="gn")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.PReLU(name="prelu")(x)
    frozen = L.Dense(3, name="frozen_dense")
    frozen.trainable = False
    h = L.Concatenate()([e, frozen(x)])
    out = L.Dense(2, name="out")(h)
    model = keras.Model([tokens, image], out)
    model.compile(keras.optimizers.Adam(amsgrad=True), "mse")
    rs = np.random.RandomState(0)
    model.fit([rs.randint(0, 20, (4, 6)), rs.rand(4, 8, 8, 3)], rs.rand(4, 2), batch_size=2, verbose=0)
    path = tmp_path_factory.mktemp("zoo") / "zoo.keras"
    model.save(path)
    model.save_weights(str(path).replace(".keras", ".weights.h5"))
    return path


def test_layer_zoo_binding_matches_keras(zoo_keras):
    _check_against_keras(zoo_keras, open_checkpoint(zoo_keras))
    weights = str(zoo_keras).replace(".keras", ".weights.h5")
    _check_against_keras(zoo_keras, open_checkpoint(weights, model=zoo_keras))
    with open_checkpoint(zoo_keras) as ck:
        names = {e.name for e in ck.entries()}
    assert {"mha/query/kernel", "bi/forward_gru/gru_cell/recurrent_kernel", "sep/pointwise_kernel",
            "bn_nocenter/gamma", "bn_nocenter/moving_variance", "gn/beta", "prelu/alpha",
            "deconv/kernel"} <= names
    assert "bn_nocenter/beta" not in names and "deconv/bias" not in names
