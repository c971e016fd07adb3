"""surgeon convert: every pair moved bit-exactly, slots re-laid-out, Keras resumes training."""
import json
import shutil
import warnings

import h5py
import numpy as np
import pytest

from conftest import FIXTURES, fixture, keras_canonical_names, load_keras_model, realworld, run_cli
from surgeon import open_checkpoint

LEGACY = FIXTURES / "legacy"
# case -> (source, extra source arg --model, output name, model to load .weights.h5 into)
CASES = {
    "k20_to_keras": (LEGACY / "k20_mlp_adam.h5", None, "k20.keras", None),
    "k22_to_keras": (LEGACY / "k22_lstm_adam.h5", None, "k22.keras", None),
    "tfk_legacy_to_keras": (LEGACY / "tfk_cnn_legacy_adam.h5", None, "tfk.keras", None),
    "tfk_legacy_to_weights": (LEGACY / "tfk_cnn_legacy_adam.h5", None, "tfk.weights.h5", "tfk.keras"),
    "k3legacy_to_keras": (LEGACY / "k3_cnn_rmsprop.h5", None, "k3r.keras", None),
    "keras_to_legacy": (FIXTURES / "cnn_adam.keras", None, "cnn_adam.h5", None),
    "keras_to_weights": (FIXTURES / "lstm_adam.keras", None, "lstm.weights.h5",
                         FIXTURES / "lstm_adam.keras"),
    "weights_to_keras": (FIXTURES / "cnn_rmsprop.weights.h5", FIXTURES / "cnn_rmsprop.keras",
                         "cnn_rmsprop.keras", None),
    "nested_to_legacy": (FIXTURES / "nested_adamw.keras", None, "nested.h5", None),
}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    from surgeon.convert import convert
    out = tmp_path_factory.mktemp("convert")
    done = {}
    for case, (src, model, name, _) in CASES.items():
        done[case] = (out / name, convert(src, out / name, model=model))
    return out, done


def _weights_of(out, case):
    w = CASES[case][3]
    return None if w is None else (out / w if isinstance(w, str) else w)


def _open_dst(out, case):
    dst = out / CASES[case][2]
    return open_checkpoint(dst, model=_weights_of(out, case) if dst.name.endswith(".weights.h5") else None)


@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_moved_bit_exact(converted, case):
    out, done = converted
    src_path, model = CASES[case][:2]
    _, report = done[case]
    assert not [p for p in report.pairs if p.source is None and p.how != "config"]
    with open_checkpoint(src_path, model=model) as src, _open_dst(out, case) as dst:
        targets = {e.name for e in dst.entries() if not e.name.startswith("optimizer/unresolved")}
        assert {p.target for p in report.pairs} == targets
        assert not [e for e in dst.entries() if e.role == "slot" and not e.slot_of]
        for p in [p for p in report.pairs if p.source]:
            got, want = dst.read(p.target), src.read(p.source)
            assert got.shape == want.shape, p
            np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=p.target)
        n_src_slots = len([e for e in src.entries() if e.role == "slot" and e.slot_of])
        assert len([p for p in report.pairs if p.how == "slot"]) == n_src_slots > 0
        assert report.iterations == src.metadata()["optimizer"]["iterations"]


def _canon(model):
    """id(variable) -> surgeon's canonical name (nested models prefix their own name)."""
    return keras_canonical_names(model)


def _slot_vars(model):
    """(canonical param, slot) -> Keras optimizer variable, from Keras' own slot names."""
    opt = model.optimizer
    canon = _canon(model)
    flat = {v.path.replace("/", "_"): canon[id(v)] for v in model.trainable_variables}
    out = {}
    for v in opt.variables:
        for slot in ("velocity_hat", "average_gradient", "momentum", "velocity"):
            stem = v.name[: -len(slot) - 1]
            if v.name.endswith("_" + slot) and stem in flat:
                out[(flat[stem], slot)] = v
                break
    return out


def _restore_legacy_slots(model, path):
    """Keras 3.15 loads a legacy H5's optimizer against ``model._trainable_variables``, which
    is empty for Functional models, so it restores only the iteration (for any legacy file,
    its own included). Do what it means to: a fresh optimizer built on the trainable variables,
    ``set_weights`` with Keras' own reader of ``optimizer_weights``. When a Keras release
    restores the slots itself, there is nothing to work around: its own result is checked."""
    from keras.src.legacy.saving.legacy_h5_format import load_optimizer_weights_from_hdf5_group
    if len(model.optimizer.variables) > 2:
        return
    with h5py.File(path) as f:
        values = [np.asarray(v) for v in load_optimizer_weights_from_hdf5_group(f)]
    opt = type(model.optimizer).from_config(model.optimizer.get_config())
    opt.build(model.trainable_variables)
    opt.set_weights(values)
    model.optimizer = opt


def _step(model, seed=0):
    """One real optimizer step; returns the gradients."""
    import tensorflow as tf
    rs = np.random.RandomState(seed)
    shape = [2] + list(model.inputs[0].shape[1:])
    x = rs.randint(0, 5, size=shape).astype(model.inputs[0].dtype)
    with tf.GradientTape() as tape, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras 2 configs list their single input
        loss = tf.reduce_mean(tf.square(model(x, training=True)))
    grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]
    model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return grads


@pytest.mark.parametrize("case", list(CASES))
def test_keras_loads_without_warnings_and_trains_on(converted, case):
    out, done = converted
    src_path, model_arg = CASES[case][:2]
    dst, _ = done[case]
    m = load_keras_model(dst, weights_of=_weights_of(out, case))
    if dst.suffix == ".h5" and not dst.name.endswith(".weights.h5"):
        _restore_legacy_slots(m, dst)
    with open_checkpoint(src_path, model=model_arg) as src:
        iters = src.metadata()["optimizer"]["iterations"]
        assert int(m.optimizer.iterations.numpy()) == iters
        canon = _canon(m)
        names = {e.name for e in src.entries() if e.role in ("param", "state")}
        compared = set()
        for v in m.weights:  # Keras sees exactly the source's weights, every one, by name
            if "seed_generator" in v.path:
                continue
            name = canon[id(v)]
            np.testing.assert_array_equal(v.numpy(), src.read(name), err_msg=name)
            compared.add(name)
        assert compared == names
        slots = _slot_vars(m)
        assert slots, "no optimizer slots in the loaded model"
        for (p, s), v in slots.items():
            np.testing.assert_array_equal(v.numpy(), src.read(f"optimizer/{p}/{s}"), err_msg=f"{p} {s}")
    before = {k: v.numpy().copy() for k, v in slots.items()}
    grads = _step(m)
    assert int(m.optimizer.iterations.numpy()) == iters + 1
    if type(m.optimizer).__name__ == "Adam":
        b1 = float(m.optimizer.beta_1)
        canon = _canon(m)
        for var, g in zip(m.trainable_variables, grads):
            key = (canon[id(var)], "momentum")
            np.testing.assert_allclose(slots[key].numpy(), b1 * before[key] + (1 - b1) * np.asarray(g),
                                       rtol=1e-5, atol=1e-7)


def test_config_upgrades_are_reported(converted):
    _, done = converted
    notes = done["k22_to_keras"][1].notes
    assert "config upgraded for Keras 3: dropped LSTM.time_major of lstm_1" in notes
    assert "config upgraded for Keras 3: dropped Embedding.input_length of embedding_1" in notes


def test_legacy_target_holds_keras3_legacy_layout(converted):
    out, _ = converted
    with h5py.File(out / "cnn_adam.h5") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["optimizer_weights"].attrs["weight_names"]]
        stem = names[0].split("/")[0]  # "adam", or "adam_4" after other conversions in-process
        assert stem.startswith("adam")
        assert names[:4] == [f"{stem}/{n}" for n in ("iteration", "learning_rate",
                                                       "conv1_kernel_momentum", "conv1_kernel_velocity")]


@pytest.fixture(scope="session")
def fer_converted(tmp_path_factory):
    from surgeon.convert import convert
    src = realworld("emotion_model.hdf5")
    dst = tmp_path_factory.mktemp("fer") / "emotion.keras"
    return src, dst, convert(src, dst)


def test_fer_converts_predicts_same_and_trains_on(fer_converted):
    from keras.src.legacy.saving import saving_utils
    src, dst, report = fer_converted
    assert len([p for p in report.pairs if p.how == "slot"]) == 104
    m = load_keras_model(dst)
    with open_checkpoint(src) as ck, h5py.File(src) as f:
        ref = saving_utils.model_from_config(json.loads(f.attrs["model_config"]))
        for v in ref.weights:  # the weights read directly from the legacy file
            v.assign(ck.read(v.path))
        x = np.random.RandomState(0).rand(3, 64, 64, 1).astype("float32")
        np.testing.assert_allclose(m.predict(x, verbose=0), ref.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
        assert int(m.optimizer.iterations.numpy()) == 92494
        slots = _slot_vars(m)
        assert len(slots) == 104
        v = slots[("conv2d_1/kernel", "velocity")]
        np.testing.assert_array_equal(v.numpy(), ck.read("optimizer/conv2d_1/kernel/velocity"))
    _step(m)
    assert int(m.optimizer.iterations.numpy()) == 92495


def test_optimizer_drop(tmp_path):
    res = run_cli("convert", LEGACY / "k20_mlp_adam.h5", tmp_path / "o.keras", "--optimizer", "drop")
    assert res.exit_code == 0, res.output
    with open_checkpoint(tmp_path / "o.keras") as ck:
        assert not [e for e in ck.entries() if e.role in ("slot", "optimizer")]
    load_keras_model(tmp_path / "o.keras")


def test_like_function_matches_by_layer_order(tmp_path):
    res = run_cli("convert", LEGACY / "k20_mlp_adam.h5", tmp_path / "r.keras",
                  "--like", "make_legacy_fixtures:build_k20_renamed", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    pairs = {p["target"]: (p["source"], p["how"]) for p in d["pairs"]}
    assert pairs["a/kernel"] == ("dense_1/kernel", "order")
    assert pairs["b/moving_variance"] == ("batch_normalization_1/moving_variance", "order")
    assert pairs["optimizer/d/bias/velocity"] == ("optimizer/dense_3/bias/velocity", "slot")
    m = load_keras_model(tmp_path / "r.keras")
    assert int(m.optimizer.iterations.numpy()) == 37


def test_unmatched_target_is_an_error_unless_allowed(tmp_path):
    dst = tmp_path / "x.keras"
    res = run_cli("convert", fixture("cnn_adam.keras"), dst, "--like", fixture("nested_adamw.keras"))
    assert res.exit_code == 2 and not dst.exists()
    assert "target tensor(s) have no source" in res.output and res.output.count("\n") == 1
    res = run_cli("convert", fixture("cnn_adam.keras"), dst, "--like", fixture("nested_adamw.keras"),
                  "--allow-missing")
    assert res.exit_code == 0, res.output
    assert "(none: Keras initial value kept)" in res.output and dst.exists()


def _lambda_config(path):
    with h5py.File(path, "a") as f:
        cfg = json.loads(f.attrs["model_config"])
        cfg["config"]["layers"][3] = {"class_name": "Lambda", "name": "dense_2", "config": {
            "name": "dense_2", "function": ["4wEAAAAAAAAAAQAAAAMAAABTAAAAcwgAAAB8AGQBFABTACkCTg==", None, None],
            "function_type": "lambda"}, "inbound_nodes": [[["batch_normalization_1", 0, 0, {}]]]}
        f.attrs["model_config"] = json.dumps(cfg)


def _corrupt_layer_names(path):
    with h5py.File(path, "a") as f:
        f["model_weights"].attrs["layer_names"] = np.array([b"input_1", b"ghost"])


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage,message", [
    (_lambda_config, "Lambda layer (dense_2) with stored Python code"),
    (_corrupt_layer_names, "layer_names lists 'ghost'"),
    (_truncate, "truncated or corrupt"),
])
def test_bad_input_one_line_exit_2_nothing_written(damage, message, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(LEGACY / "k20_mlp_adam.h5", bad)
    damage(bad)
    dst = tmp_path / "out.keras"
    res = run_cli("convert", bad, dst)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("surgeon: error: ") and res.output.count("\n") == 1
    assert message in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]


def test_help_has_example():
    res = run_cli("convert", "--help")
    assert res.exit_code == 0 and "Examples:" in res.output and "--allow-missing" in res.output


def test_to_tf_checkpoint_restores_in_tf(converted, tmp_path):
    pytest.importorskip("surgeon.formats.tf_bundle")
    import tensorflow as tf
    from surgeon.convert import convert
    out, _ = converted
    prefix = tmp_path / "k20.ckpt"
    report = convert(LEGACY / "k20_mlp_adam.h5", prefix)
    assert report.target_format == "tf-checkpoint" and report.iterations == 37
    m = load_keras_model(out / "k20.keras")  # the same model and optimizer, built by Keras
    for v in list(m.weights) + list(m.optimizer.variables):
        v.assign(np.zeros(v.shape, v.dtype))
    tf.train.Checkpoint(model=m, optimizer=m.optimizer).read(str(prefix)).assert_consumed()
    assert int(m.optimizer.iterations.numpy()) == 37
    with open_checkpoint(LEGACY / "k20_mlp_adam.h5") as src:
        canon = _canon(m)
        for v in m.weights:
            np.testing.assert_array_equal(v.numpy(), src.read(canon[id(v)]))
        slots = _slot_vars(m)
        assert len(slots) == 12
        for (p, s), v in slots.items():
            np.testing.assert_array_equal(v.numpy(), src.read(f"optimizer/{p}/{s}"))


def test_weights_only_legacy_with_like_starts_a_fresh_optimizer(converted, tmp_path):
    out, _ = converted
    dst = tmp_path / "w.keras"
    res = run_cli("convert", LEGACY / "k20_weights_only.h5", dst, "--like", out / "k20.keras")
    assert res.exit_code == 0, res.output
    assert "note: the source holds no bound optimizer state: the target optimizer starts fresh" in res.output
    m = load_keras_model(dst)
    assert int(m.optimizer.iterations.numpy()) == 0
    with open_checkpoint(LEGACY / "k20_weights_only.h5") as src:
        canon = _canon(m)
        for v in m.weights:
            np.testing.assert_array_equal(v.numpy(), src.read(canon[id(v)]))


def test_like_reordered_layers_match_by_name(tmp_path):
    """Two same-shaped layers in the opposite order in --like: weights and slots follow the
    names (pairing by position would swap them and still fit every shape)."""
    import keras

    def build(order):
        keras.utils.set_random_seed(len(order[0]))
        inp = keras.Input((4,), name="x")
        h = inp
        for n in order:
            h = keras.layers.Dense(4, activation="tanh", name=n)(h)
        m = keras.Model(inp, keras.layers.Dense(2, name="out")(h))
        m.compile(keras.optimizers.Adam(0.01), "mse")
        rs = np.random.RandomState(len(order))
        m.fit(rs.randn(8, 4), rs.randn(8, 2), batch_size=4, verbose=0, shuffle=False)
        return m

    build(["p", "q"]).save(tmp_path / "src.keras")
    build(["q", "p"]).save(tmp_path / "like.keras")
    res = run_cli("convert", tmp_path / "src.keras", tmp_path / "out.keras", "--like", tmp_path / "like.keras")
    assert res.exit_code == 0, res.output
    a, b = load_keras_model(tmp_path / "src.keras"), load_keras_model(tmp_path / "out.keras")
    assert [layer.name for layer in b.layers[1:3]] == ["q", "p"]
    for name in ("p", "q", "out"):
        for va, vb in zip(a.get_layer(name).weights, b.get_layer(name).weights):
            np.testing.assert_array_equal(vb.numpy(), va.numpy(), err_msg=va.path)
    want = {v.name: v.numpy() for v in a.optimizer.variables}
    got = {v.name: v.numpy() for v in b.optimizer.variables}
    assert got.keys() == want.keys() and len(want) == 2 + 2 * 6
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
