"""Legacy Keras H5: reading, optimizer binding per naming scheme, lossless write-back."""
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import FIXTURES, realworld, run_cli
from h5compare import assert_h5_equal
from surgeon import open_checkpoint, open_writer

LEGACY = FIXTURES / "legacy"
FILES = ["k20_mlp_adam.h5", "k22_lstm_adam.h5", "k20_weights_only.h5", "k3_cnn_adam.h5",
         "k3_lstm_adam.h5", "k3_cnn_rmsprop.h5", "tfk_cnn_adam.h5", "tfk_cnn_legacy_adam.h5",
         "tfk_cnn_rmsprop.h5"]


def legacy(name):
    p = LEGACY / name
    assert p.exists(), f"missing {p}; run python fixtures/make_legacy_fixtures.py"
    return p


def slots(ck):
    return {e.name: e for e in ck.entries() if e.role == "slot"}


@pytest.mark.parametrize("name", FILES)
def test_identity_roundtrip_is_lossless(name, tmp_path):
    out = tmp_path / name
    with open_checkpoint(legacy(name)) as ck:
        assert ck.format == "legacy-h5"
        with open_writer(out, like=ck) as w:
            w.finalize()
    assert_h5_equal(legacy(name), out)


@pytest.mark.parametrize("name", ["k20_mlp_adam.h5", "tfk_cnn_legacy_adam.h5", "k3_lstm_adam.h5"])
def test_write_param_and_slot_changes_only_them(name, tmp_path):
    out = tmp_path / name
    with open_checkpoint(legacy(name)) as ck:
        p = next(e for e in ck.entries() if e.role == "param" and not e.frozen)
        s = next(e for e in ck.entries() if e.slot_of == p.name)
        newp, news = ck.read(p.name) + 1, ck.read(s.name) * 0
        with open_writer(out, like=ck) as w:
            w.write(p.name, newp)
            w.write(s.name, news)
            w.finalize()
        with open_checkpoint(out) as back:
            assert [e.name for e in back.entries()] == [e.name for e in ck.entries()]
            for e in ck.entries():
                want = newp if e.name == p.name else news if e.name == s.name else ck.read(e.name)
                np.testing.assert_array_equal(back.read(e.name), want)
    with h5py.File(out) as f, h5py.File(legacy(name)) as g:
        assert dict(f.attrs) .keys() == dict(g.attrs).keys()
        assert f.attrs["model_config"] == g.attrs["model_config"]


def test_keras20_blocked_name_sorted_layout():
    """Keras 2.0: Variable_N = all m's then all v's over trainables sorted by variable name."""
    with open_checkpoint(legacy("k20_mlp_adam.h5")) as ck, h5py.File(legacy("k20_mlp_adam.h5")) as f:
        trainable = sorted(wn.decode() for layer in ("dense_1", "batch_normalization_1", "dense_3")
                           for wn in f["model_weights"][layer].attrs["weight_names"]
                           if b"moving" not in wn)
        n = len(trainable)
        assert n == 6
        for i, wn in enumerate(trainable):
            canon = wn[:-2]
            assert ck.entry(f"optimizer/{canon}/momentum").key == f"optimizer_weights/Variable_{10 + i}:0"
            assert ck.entry(f"optimizer/{canon}/velocity").key == f"optimizer_weights/Variable_{10 + n + i}:0"
        assert not any(e.slot_of and e.slot_of.startswith("dense_2") for e in ck.entries())
        assert ck.entry("dense_2/kernel").frozen
        assert ck.entry("batch_normalization_1/moving_mean").role == "state"
        md = ck.metadata()
        assert md["optimizer"]["iterations"] == 37 and md["optimizer"]["class_name"] == "Adam"
        assert md["notes"] == []


def test_keras22_training_scope_with_vhat_placeholders():
    with open_checkpoint(legacy("k22_lstm_adam.h5")) as ck:
        params = [e.name for e in ck.entries() if e.role == "param"]
        assert params == ["embedding_1/embeddings", "lstm_1/lstm_cell/kernel",
                          "lstm_1/lstm_cell/recurrent_kernel", "lstm_1/lstm_cell/bias",
                          "dense_1/kernel", "dense_1/bias"]
        for i, p in enumerate(params):  # model order; ms, vs, then (1,) vhats
            m = "training/Adam/Variable:0" if i == 0 else f"training/Adam/Variable_{i}:0"
            assert ck.entry(f"optimizer/{p}/momentum").key == f"optimizer_weights/{m}"
            assert ck.entry(f"optimizer/{p}/velocity").key == f"optimizer_weights/training/Adam/Variable_{6 + i}:0"
        holders = [e for e in ck.entries() if e.name.startswith("optimizer/placeholder/")]
        assert len(holders) == 6 and all(e.shape == (1,) and e.role == "optimizer" for e in holders)
        assert ck.metadata()["optimizer"]["iterations"] == 21


@pytest.mark.parametrize("name", ["k3_cnn_adam", "k3_lstm_adam", "k3_cnn_rmsprop"])
def test_keras3_legacy_writer_matches_keras3_tree(name):
    """One trained model saved by Keras as .keras and as legacy .h5: same tree, same values."""
    with open_checkpoint(legacy(name + ".h5")) as ck, open_checkpoint(legacy(name + ".keras")) as k3:
        want = {e.name: e for e in k3.entries()}
        got = {e.name: e for e in ck.entries()}
        assert set(got) == set(want)
        for n, e in want.items():
            assert (got[n].role, got[n].slot_of, got[n].slot, got[n].shape) == \
                (e.role, e.slot_of, e.slot, e.shape), n
            np.testing.assert_array_equal(ck.read(n), k3.read(n), err_msg=n)


@pytest.mark.parametrize("name,keyfmt,slotnames", [
    ("tfk_cnn_adam.h5", "optimizer_weights/Adam/{legacy}/{var}:0", {"momentum": "m", "velocity": "v"}),
    ("tfk_cnn_legacy_adam.h5", "optimizer_weights/Adam/{var}/{legacy}:0", {"momentum": "m", "velocity": "v"}),
    ("tfk_cnn_rmsprop.h5", "optimizer_weights/RMSprop/{legacy}/{var}:0",
     {"velocity": "velocity", "momentum": "momentum"}),
])
def test_tf_keras_named_schemes(name, keyfmt, slotnames):
    with open_checkpoint(legacy(name)) as ck:
        params = [e for e in ck.entries() if e.role == "param"]
        trainable = [e for e in params if not e.frozen]
        assert [e.name for e in params if e.frozen] == ["frozen/kernel", "frozen/bias"]
        assert len(slots(ck)) == len(trainable) * len(slotnames) == 16
        for p in trainable:
            for slot, leg in slotnames.items():
                s = ck.entry(f"optimizer/{p.name}/{slot}")
                assert s.key == keyfmt.format(legacy=leg, var=p.name) and s.shape == p.shape
        assert ck.metadata()["optimizer"]["iterations"] == 3
        assert ck.entry("bn/moving_variance").role == "state"


def test_split_layer_names_weights_only():
    with h5py.File(legacy("k20_weights_only.h5")) as f:
        assert "layer_names" not in f.attrs and "layer_names1" in f.attrs
    with open_checkpoint(legacy("k20_weights_only.h5")) as ck:
        names = [e.name for e in ck.entries()]
        assert names[:3] == ["dense_1/kernel", "dense_1/bias", "batch_normalization_1/gamma"]
        assert names[-2:] == ["dense_3/kernel", "dense_3/bias"] and len(names) == 10
        assert ck.metadata()["optimizer"] is None
        assert ck.entry("batch_normalization_1/moving_variance").role == "state"


def test_positional_layout_that_does_not_fit_is_unresolved(tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(legacy("k20_mlp_adam.h5"), bad)
    with h5py.File(bad, "a") as f:  # drop the last v: 11 slot weights for 6 params
        og = f["optimizer_weights"]
        names = list(og.attrs["weight_names"])
        del og[names[-1].decode()]
        og.attrs["weight_names"] = np.array(names[:-1])
    with open_checkpoint(bad) as ck:
        bound = [e for e in ck.entries() if e.role == "slot" and e.slot_of]
        unresolved = [e for e in ck.entries() if e.name.startswith("optimizer/unresolved/")]
        assert not bound and len(unresolved) == 11
        assert "no known layout that fits" in ck.metadata()["notes"][0]


def test_fer_binds_all_104_slots():
    path = realworld("emotion_model.hdf5")
    res = run_cli("ls", path, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    ent = {e["name"]: e for e in d["entries"]}
    params = [e for e in d["entries"] if e["role"] == "param"]
    slot_entries = [e for e in d["entries"] if e["role"] == "slot"]
    assert len([e for e in d["entries"] if e["role"] in ("param", "state")]) == 80
    assert len(params) == 52 and len(slot_entries) == 104
    assert all(e["slot_of"] for e in slot_entries)
    for e in slot_entries:
        assert e["shape"] == ent[e["slot_of"]]["shape"]
    assert {(e["slot_of"], e["slot"]) for e in slot_entries} == \
        {(p["name"], s) for p in params for s in ("momentum", "velocity")}
    assert d["optimizer"]["iterations"] == 92494 and d["notes"] == []
    assert ent["conv2d_1/kernel"]["key"] == "model_weights/conv2d_1/conv2d_1_1/kernel:0"


def _corrupt_weight_names(path):
    with h5py.File(path, "a") as f:
        f["model_weights/dense_1"].attrs["weight_names"] = np.array([b"dense_1/nope:0"])


def _bad_json(path):
    with h5py.File(path, "a") as f:
        f.attrs["model_config"] = "{not json"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("damage,message", [
    (_corrupt_weight_names, "weight_names of layer 'dense_1' lists 'dense_1/nope:0'"),
    (_bad_json, "root attr 'model_config' is not valid JSON"),
    (_truncate, "truncated or corrupt"),
])
def test_bad_input_is_one_line_exit_2(damage, message, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(legacy("k20_mlp_adam.h5"), bad)
    damage(bad)
    res = run_cli("ls", bad)
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith("surgeon: error: ")
    assert message in res.output


def test_ls_legacy_does_not_import_tensorflow():
    code = ("import sys; from surgeon import open_checkpoint; "
            f"ck = open_checkpoint({str(legacy('tfk_cnn_adam.h5'))!r}); ck.entries(); "
            "print('tensorflow' in sys.modules or 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("layer,cls,cfg,wname,want", [
    ("conv2d_1", "Conv2D", None, "conv2d_1_1/kernel:0", "conv2d_1/kernel"),  # Keras 2.0 scope
    ("lstm_1", "LSTM", None, "lstm_1/kernel:0", "lstm_1/lstm_cell/kernel"),  # Keras 2.x
    ("lstm", "LSTM", None, "lstm/lstm_cell/kernel:0", "lstm/lstm_cell/kernel"),  # tf.keras
    ("bn", "BatchNormalization", None, "sequential/bn/gamma", "bn/gamma"),  # Keras 3 writer
    ("backbone", "Functional", None, "fc1/kernel:0", "backbone/fc1/kernel"),  # nested model
    ("bidirectional_1", "Bidirectional", {"layer": {"class_name": "LSTM"}},
     "bidirectional_1/forward_lstm_1/kernel:0", "bidirectional_1/forward_lstm_1/lstm_cell/kernel"),
])
def test_canonical_names(layer, cls, cfg, wname, want):
    from surgeon.formats.legacy_h5 import canonical_name
    assert canonical_name(layer, cls, wname, cfg)[0] == want


@pytest.mark.parametrize("version,bound", [("2.0.5", True), ("2.2.4", True), ("2.1.6", False)])
def test_positional_order_decided_by_version_or_unresolved(version, bound):
    """Four same-shaped params: model order and name order both fit the shapes. Keras 2.0
    sorted by name, 2.2 kept model order; for 2.1 surgeon does not know, so it refuses."""
    from surgeon.binding import legacy as lb
    params = [lb.Param(f"{n}/kernel", f"{n}/kernel:0", (2, 2)) for n in ("z", "a", "m", "b")]
    weights = [lb.OptWeight(0, "iterations:0", ())] + [
        lb.OptWeight(i + 1, f"Variable_{i}:0", (2, 2)) for i in range(8)]
    b = lb.bind(weights, params, "Adam", {}, version)
    assert b.globals == {0: "iteration"}
    if not bound:
        assert b.slots == {} and len(b.unresolved) == 8 and "ambiguous" in b.notes[0]
        return
    order = sorted(params, key=lambda p: p.wname) if version == "2.0.5" else params
    assert [b.slots[i + 1] for i in range(4)] == [(p.name, "momentum") for p in order]
    assert [b.slots[i + 5] for i in range(4)] == [(p.name, "velocity") for p in order]
    assert b.notes == []


def _raw_keras20(path):
    """An independent reader of a Keras 2.0 file (h5py, Keras 2.0's own rule, no surgeon):
    weights by their stored names, and {weight name: (m, v)} where Keras 2.0's Adam laid
    out ``[iterations] + ms + vs`` over the trainable weights sorted by variable name
    (``_collect_trainable_weights``: ``weights.sort(key=lambda x: x.name)``)."""
    with h5py.File(path) as f:
        cfg = json.loads(f.attrs["model_config"])
        frozen = {layer["name"] for layer in cfg["config"]["layers"]
                  if layer["config"].get("trainable") is False}
        mw = f["model_weights"]
        weights, trainable = {}, []
        for layer in (n.decode() for n in mw.attrs["layer_names"]):
            for wn in (n.decode() for n in mw[layer].attrs["weight_names"]):
                weights[wn] = np.asarray(mw[layer][wn])
                if layer not in frozen and "moving_" not in wn:
                    trainable.append(wn)
        ow = f["optimizer_weights"]
        opt = [np.asarray(ow[n.decode()]) for n in ow.attrs["weight_names"]][1:]
        tc = json.loads(f.attrs["training_config"])["optimizer_config"]["config"]
    n = len(trainable)
    assert len(opt) == 2 * n
    order = sorted(trainable)
    return weights, trainable, {wn: (opt[i], opt[n + i]) for i, wn in enumerate(order)}, tc


@pytest.mark.parametrize("name", ["realworld:emotion_model.hdf5", "k20_mlp_adam.h5"])
def test_keras20_values_against_raw_h5(name):
    """Keras 2.0.5 files (fer's real one first): every weight and every Adam slot surgeon
    reads equals the dataset an independent h5py reader finds for it. Model order would not
    even fit the shapes, so the name-sorted layout is what the real file holds."""
    path = realworld(name.split(":")[1]) if name.startswith("realworld:") else legacy(name)
    weights, trainable, slots_by_name, tc = _raw_keras20(path)
    stored = [m.shape for m, _ in (slots_by_name[w] for w in sorted(trainable))]
    assert [weights[w].shape for w in trainable] != stored  # model order does not fit
    b1, b2 = tc["beta_1"], tc["beta_2"]
    bound = (1 - b1) ** 2 / ((1 - b2) * (1 - b1 ** 2 / b2))  # Adam: m**2 <= bound * v
    with open_checkpoint(path) as ck:
        by_key = {e.key.split("/", 2)[-1]: e for e in ck.entries() if e.role in ("param", "state")}
        assert sorted(by_key) == sorted(weights)
        for wn, value in weights.items():
            np.testing.assert_array_equal(ck.read(by_key[wn].name), value, err_msg=wn)
        for wn in trainable:
            name, (m, v) = by_key[wn].name, slots_by_name[wn]
            np.testing.assert_array_equal(ck.read(f"optimizer/{name}/momentum"), m, err_msg=wn)
            np.testing.assert_array_equal(ck.read(f"optimizer/{name}/velocity"), v, err_msg=wn)
            assert (v >= 0).all() and (m.astype(np.float64) ** 2 <= bound * v * 1.001 + 1e-30).all(), wn
