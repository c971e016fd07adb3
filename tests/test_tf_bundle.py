"""TF bundles (TF2 object-based, TF1 name-based, SavedModel): TensorFlow/Keras is the oracle.

Checkpoints are built at session scope by fixtures/make_tf_fixtures.py (which also wrote
the committed fixtures/tf/), so the tests can restore into the *original* objects.
"""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, realworld, run_cli
import surgeon

TF = FIXTURES / "tf"


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    import make_tf_fixtures as mk
    root = tmp_path_factory.mktemp("tfb")
    out = {}
    for combo in ("keras3_cnn_adam", "keras3_lstm_rmsprop"):
        out[combo] = mk.keras3_checkpoint(str(root / combo), combo,
                                          shard_bytes=1500 if "cnn" in combo else None)
    out["v1opt"] = mk.v1opt_checkpoint(str(root / "v1opt"))
    for opt in ("Adam", "RMSPropCentered"):
        out[f"tf1_{opt}"] = mk.tf1_checkpoint(str(root / f"tf1_{opt}" / "model-1"), opt)
    out["root"] = root
    return out


def _values(reader):
    return {e.name: reader.read(e.name) for e in reader.entries()}


# -- Keras 3 + tf.train.Checkpoint -------------------------------------------------------
@pytest.mark.parametrize("combo", ["keras3_cnn_adam", "keras3_lstm_rmsprop"])
def test_keras3_names_roles_and_slots_match_keras(built, combo):
    model, opt, _, prefix = built[combo]
    with surgeon.open_checkpoint(os.path.dirname(prefix)) as ck:
        entries = {e.name: e for e in ck.entries()}
        trainable = {v.path for v in model.trainable_variables}
        for v in model.weights:
            e = entries[v.path]
            assert np.array_equal(ck.read(v.path), v.numpy())
            assert e.role == ("param" if v.trainable else "state") or e.frozen
        assert entries["frozen/kernel"].frozen if "cnn" in combo else True
        stem = opt.name
        n_slots = 0
        for ov in opt.variables:
            name = ov.path.split("/", 1)[1]
            if name in ("iteration", "learning_rate"):
                assert np.array_equal(ck.read(f"optimizer/{name}"), ov.numpy())
                continue
            param = next(p for p in sorted(trainable, key=len, reverse=True)
                         if name.startswith(p.replace("/", "_") + "_"))
            slot = name[len(param) + 1:]
            e = entries[f"optimizer/{param}/{slot}"]
            assert (e.slot_of, e.slot, e.role) == (param, slot, "slot")
            assert np.array_equal(ck.read(e.name), ov.numpy())
            n_slots += 1
        assert n_slots == sum(1 for e in entries.values() if e.role == "slot") > 0
        assert ck.metadata()["optimizer"]["iterations"] == int(opt.iterations.numpy())
        assert stem.startswith(ck.metadata()["optimizer"]["name"])


def test_keras3_sharded_writeback_assert_consumed(built, tmp_path):
    model, opt, ckpt, prefix = built["keras3_cnn_adam"]
    src = Path(prefix).parent
    assert len(list(src.glob("*.data-*"))) > 1  # really sharded
    with surgeon.open_checkpoint(src) as ck:
        new_k = ck.read("conv1/kernel") * 2
        new_m = ck.read("optimizer/conv1/kernel/momentum") + 1
        with surgeon.open_writer(tmp_path / "out", like=ck) as w:
            w.write("conv1/kernel", new_k)
            w.write("optimizer/conv1/kernel/momentum", new_m)
            w.finalize()
        before = _values(ck)
    out = tmp_path / "out"
    assert (out / "checkpoint").read_text().startswith('model_checkpoint_path: "ckpt-1"')
    import tensorflow as tf
    tf.train.Checkpoint(model=model, optimizer=opt).restore(
        tf.train.latest_checkpoint(str(out))).assert_consumed()
    assert np.array_equal(model.get_layer("conv1").kernel.numpy(), new_k)
    assert np.array_equal(opt._momentums[0].numpy(), new_m)
    with surgeon.open_checkpoint(out) as ck2:
        after = _values(ck2)
        assert sorted(ck2.keys) == sorted(tf.train.load_checkpoint(prefix).get_variable_to_shape_map())
    changed = {"conv1/kernel", "optimizer/conv1/kernel/momentum"}
    for name, value in before.items():
        if name not in changed:
            assert np.array_equal(after[name], value), name


# -- legacy TF optimizer (tf.compat.v1.train.AdamOptimizer) in an object-based checkpoint --
def test_legacy_optimizer_slots_bound_through_slot_records(built, tmp_path):
    net, opt, ckpt, prefix = built["v1opt"]
    with surgeon.open_checkpoint(prefix) as ck:
        e = {x.name: x for x in ck.entries()}
        for var, name in ((net.kernel, "dense/kernel"), (net.bias, "dense/bias"),
                          (net.w, "out/kernel")):
            assert e[name].role == "param" and np.array_equal(ck.read(name), var.numpy())
            for tf_slot, slot in (("m", "momentum"), ("v", "velocity")):
                s = e[f"optimizer/{name}/{slot}"]
                assert (s.slot_of, s.role) == (name, "slot")
                assert ".OPTIMIZER_SLOT" in s.key
                assert np.array_equal(ck.read(s.name), opt.get_slot(var, tf_slot).numpy())
        assert e["steps"].role == "state"
        assert ck.metadata()["optimizer"]["class_name"] == "Adam"
        b1 = opt._get_beta_accumulators()[0].numpy()
        assert np.array_equal(ck.read("optimizer/beta1_power"), b1)
        with surgeon.open_writer(tmp_path / "ckpt-9", like=ck) as w:
            w.write("optimizer/dense/kernel/velocity", ck.read("optimizer/dense/kernel/velocity") * 0)
            w.finalize()
    import tensorflow as tf
    tf.train.Checkpoint(model=net, optimizer=opt).restore(str(tmp_path / "ckpt-9")).assert_consumed()
    assert not opt.get_slot(net.kernel, "v").numpy().any()


# -- TF1 name-based -------------------------------------------------------------------------
TF1_SLOTS = {"Adam": {"Adam": "momentum", "Adam_1": "velocity"},
             "RMSPropCentered": {"RMSProp": "velocity", "RMSProp_1": "average_gradient",
                                 "RMSProp_2": "momentum"}}


@pytest.mark.parametrize("opt", ["Adam", "RMSPropCentered"])
def test_tf1_names_and_slots(built, opt, tmp_path):
    values, graph, saver, variables = built[f"tf1_{opt}"]
    prefix = str(built["root"] / f"tf1_{opt}" / "model-1")
    with surgeon.open_checkpoint(prefix) as ck:
        e = {x.name: x for x in ck.entries()}
        assert e["optimizer/iteration"].role == "optimizer"
        assert e["optimizer/iteration"].key == "global_step"
        assert int(ck.read("optimizer/iteration")) == int(values["global_step"]) == 2
        assert e["bn/moving_mean"].role == "state"
        for name in ("fc1/kernel", "fc1/bias", "fc2/kernel"):
            assert e[name].role == "param"
            assert np.array_equal(ck.read(name), values[name])
            for suffix, slot in TF1_SLOTS[opt].items():
                s = e[f"optimizer/{name}/{slot}"]
                assert (s.key, s.slot_of) == (f"{name}/{suffix}", name)
                assert np.array_equal(ck.read(s.name), values[f"{name}/{suffix}"])
        if opt == "Adam":
            assert e["optimizer/beta1_power"].role == "optimizer"
        new = ck.read("fc2/kernel") + 0.5
        with surgeon.open_writer(tmp_path / "new", like=ck) as w:
            w.write("fc2/kernel", new)
            w.finalize()
    import tensorflow as tf
    with graph.as_default(), tf.compat.v1.Session() as s:
        saver.restore(s, str(tmp_path / "new"))
        got = dict(zip(variables, s.run(list(variables.values()))))
    for name, value in values.items():
        assert np.array_equal(got[name], new if name == "fc2/kernel" else value), name


def test_tf1_empty_prefix_with_stale_state_file(tmp_path):
    state = (TF / "tf1_rmsprop_empty" / "checkpoint").read_text()
    assert "/tmp/" in state and (TF / "tf1_rmsprop_empty" / ".index").exists()
    result = run_cli("ls", TF / "tf1_rmsprop_empty", "--json")
    assert result.exit_code == 0, result.output
    import json
    doc = json.loads(result.output)
    slots = {(x["slot_of"], x["slot"]) for x in doc["entries"] if x["role"] == "slot"}
    assert ("fc1/kernel", "velocity") in slots and ("fc1/kernel", "momentum") in slots
    with surgeon.open_checkpoint(TF / "tf1_rmsprop_empty") as ck:
        assert ck.prefix.endswith("tf1_rmsprop_empty/")
        # RMSProp's rms slot starts at ones (TF1): velocity, not momentum
        v = ck.read("optimizer/fc1/kernel/velocity")
        assert np.all(v > 0.5) and ck.entry("optimizer/fc1/kernel/velocity").key == "fc1/kernel/RMSProp"
        with surgeon.open_writer(tmp_path / "copy", like=ck) as w:
            w.finalize()
        before = _values(ck)
    assert (tmp_path / "copy" / ".index").exists()
    with surgeon.open_checkpoint(tmp_path / "copy") as ck2:
        assert {k: v.tolist() for k, v in _values(ck2).items()} == \
            {k: v.tolist() for k, v in before.items()}


# -- SavedModel ---------------------------------------------------------------------------
def test_module_savedmodel_roundtrip_served(tmp_path):
    import tensorflow as tf
    src = TF / "module_savedmodel"
    x = np.array([[1.0, -2.0, 0.5]], "float32")
    with surgeon.open_checkpoint(src) as ck:
        assert ck.format == "saved-model"
        k = ck.read("dense/kernel")
        b = ck.read("dense/bias")
        w = ck.read("out/kernel")
        with surgeon.open_writer(tmp_path / "sm", like=ck) as wr:
            wr.write("out/kernel", w * 3)
            wr.finalize()
    assert (tmp_path / "sm" / "saved_model.pb").read_bytes() == (src / "saved_model.pb").read_bytes()
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    expected = np.maximum(x @ k + b, 0) @ (w * 3)
    np.testing.assert_allclose(loaded.signatures["serving_default"](tf.constant(x))["output_0"],
                               expected, rtol=1e-6)


def test_basic_pitch_names_slots_and_identity_writeback(tmp_path):
    src = realworld("basic_pitch_nmp")
    import tensorflow as tf
    with surgeon.open_checkpoint(src) as ck:
        entries = ck.entries()
        params = [e for e in entries if e.role == "param"]
        slots = [e for e in entries if e.role == "slot"]
        assert {e.layer for e in params} >= {"conv2d_1", "contours-reduced", "batch_normalization"}
        assert all(e.slot_of for e in slots) and len(slots) == 2 * len(params) == 36
        assert {(e.slot_of, e.slot) for e in slots} == {(p.name, s) for p in params
                                                        for s in ("momentum", "velocity")}
        assert ck.metadata()["optimizer"]["iterations"] == 17900
        with surgeon.open_writer(tmp_path / "nmp", like=ck) as w:
            w.finalize()
        kernel = ck.read("conv2d_1/kernel")
    assert (tmp_path / "nmp" / "saved_model.pb").read_bytes() == (src / "saved_model.pb").read_bytes()
    pytest.importorskip("tf_keras", reason="tf.saved_model.load needs tf-keras to revive the "
                        "TF 2.4 optimizer (pip install surgeon[tfkeras])")
    loaded = tf.saved_model.load(str(tmp_path / "nmp"))
    served = {v.name.split(":")[0]: v for v in loaded.variables}
    assert np.array_equal(served["conv2d_1/kernel"].numpy(), kernel)
    fn = loaded.signatures["serving_default"]
    spec = next(iter(fn.structured_input_signature[1].values()))
    out = fn(tf.zeros([1] + [d or 1 for d in spec.shape[1:]], spec.dtype))
    assert all(np.isfinite(v.numpy()).all() for v in out.values())


# -- CLI and bad input ----------------------------------------------------------------------
@pytest.mark.parametrize("name,expect", [
    ("keras3_cnn_adam", "optimizer: Adam (stored as adam), iterations=3"),
    ("keras3_nested_adamw", "note: nested models"),
    ("v1opt_adam", "optimizer: Adam (stored as Adam)"),
    ("tf1_adam/model-1", "fc1/\n  bias"),
    ("tf1_momentum/model-1.index", "slots: momentum"),
    ("tf1_adagrad", "slots: accumulator"),
    ("module_savedmodel", "[saved-model]"),
])
def test_cli_ls(name, expect):
    result = run_cli("ls", TF / name)
    assert result.exit_code == 0, result.output
    assert expect in result.output


def _copy(tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(TF / name, dst)
    return dst


def test_truncated_index(tmp_path):
    d = _copy(tmp_path, "tf1_adam")
    idx = d / "model-1.index"
    idx.write_bytes(idx.read_bytes()[:-20])
    r = run_cli("ls", d)
    assert r.exit_code == 2
    assert r.output == f"surgeon: error: {idx}: truncated or corrupt checkpoint index (no table footer)\n"


def test_missing_data_shard_nothing_written(tmp_path):
    d = _copy(tmp_path, "keras3_cnn_adam")
    (d / "ckpt-1.data-00001-of-00003").unlink()
    r = run_cli("ls", d)
    assert r.exit_code == 2
    assert r.output == (f"surgeon: error: {d}/ckpt-1.data-00001-of-00003: missing data shard "
                        f"(2 of 3) of checkpoint {d}/ckpt-1.index\n")


def test_object_graph_does_not_parse(tmp_path):
    import tensorflow as tf
    prefix = str(tmp_path / "bad")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=["_CHECKPOINTABLE_OBJECT_GRAPH", "x"],
                      shape_and_slices=["", ""],
                      tensors=[tf.constant(b"\xff\xff not a proto"), tf.constant([1.0])])
    r = run_cli("ls", prefix)
    assert r.exit_code == 2
    assert r.output.startswith(f"surgeon: error: {prefix}.index: object graph "
                               "_CHECKPOINTABLE_OBJECT_GRAPH does not parse: ")
    assert r.output.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.data-00000-of-00001", "bad.index"]


def test_failed_write_leaves_no_output(tmp_path):
    with surgeon.open_checkpoint(TF / "tf1_adam") as ck:
        with pytest.raises(RuntimeError):
            with surgeon.open_writer(tmp_path / "out", like=ck) as w:
                w.write("fc1/kernel", ck.read("fc1/kernel"))
                raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
