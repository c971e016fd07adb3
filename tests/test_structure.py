"""Structural surgery (issue 8) on real Keras models: function preservation, loading without
warnings, training on with the optimizer state, slot math, channel deletion through
BatchNorm/Flatten/Concatenate/Add, graph rewiring, and plan-time errors."""
import json

import numpy as np
import pytest

from conftest import FIXTURES, load_keras_model, run_cli
from surgeon import open_checkpoint, structure as S

STRUCT = FIXTURES / "structure"
SHAPES = {"mlp_adam": (6,), "convbn_sgdm": (8, 8, 3), "residual_rms": (6, 6, 3),
          "skipinput_adam": (4,)}


def src(name):
    p = STRUCT / f"{name}.keras"
    assert p.exists(), f"missing {p}; run python fixtures/make_structure_fixtures.py"
    return p


def inputs(name, n=5):
    return np.random.default_rng(1).normal(size=(n,) + SHAPES[name]).astype("float32")


def outputs(path, x):
    return np.asarray(load_keras_model(path)(x, training=False))


def assert_same_function(a, b):
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel <= 1e-5, f"outputs differ: max relative {rel}"


def tensors(path):
    with open_checkpoint(path) as ck:
        return {e.name: ck.read(e.name) for e in ck.entries()}, {e.name: e for e in ck.entries()}


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("structure")


@pytest.fixture(scope="session")
def made(out_dir):
    """Run each planned edit once per session; returns {key: (plan, output path)}."""
    cache = {}

    def get(key, planner, fx, **kw):
        if key not in cache:
            plan = planner(src(fx), **kw)
            out = out_dir / f"{key}.keras"
            S.execute(plan, out)
            cache[key] = (plan, out)
        return cache[key]
    return get


FUNCTION_PRESERVING = [
    ("widen_mlp_fc1", S.plan_widen, "mlp_adam", dict(layer="fc1", to=13)),
    ("widen_convbn_conv1", S.plan_widen, "convbn_sgdm", dict(layer="conv1", to=7)),
    ("widen_convbn_conv2_flatten", S.plan_widen, "convbn_sgdm", dict(layer="conv2", to=9)),
    ("widen_residual_c2_add", S.plan_widen, "residual_rms", dict(layer="c2", to=7)),
    ("deepen_mlp_fc1", S.plan_deepen, "mlp_adam", dict(after="fc1")),
    ("deepen_convbn_relu1", S.plan_deepen, "convbn_sgdm", dict(after="relu1")),
    ("deepen_residual_add", S.plan_deepen, "residual_rms", dict(after="add")),
    ("insert_dropout", S.plan_insert_layer, "mlp_adam",
     dict(after="fc1", spec={"class_name": "Dropout", "config": {"rate": 0.2}}, name="drop")),
]


@pytest.mark.parametrize("key,planner,name,kw", FUNCTION_PRESERVING, ids=[c[0] for c in FUNCTION_PRESERVING])
def test_function_preserved(made, key, planner, name, kw):
    _, out = made(key, planner, name, **kw)
    x = inputs(name)
    assert_same_function(outputs(src(name), x), outputs(out, x))


def test_delete_identity_layer_restores_original(made, out_dir):
    for key, name, layer in (("deepen_convbn_relu1", "convbn_sgdm", "relu1_deep"),
                             ("deepen_residual_add", "residual_rms", "add_deep")):
        _, deep = made(key, S.plan_deepen, name, after=layer.rsplit("_deep", 1)[0])
        back = out_dir / f"{key}_back.keras"
        S.execute(S.plan_delete_layer(deep, layer), back)
        x = inputs(name)
        assert_same_function(outputs(deep, x), outputs(back, x))
        orig, _ = tensors(src(name))
        new, _ = tensors(back)
        assert set(orig) == set(new)
        for k in orig:  # every weight, slot, iteration: bit-identical to the source
            assert np.array_equal(orig[k], new[k]), k


def test_widen_slot_math_and_untouched_bit_identical(made):
    plan, out = made("widen_mlp_fc1", S.plan_widen, "mlp_adam", layer="fc1", to=13)
    old, _ = tensors(src("mlp_adam"))
    new, _ = tensors(out)
    index = plan.actions["fc1/kernel"].steps[0]["index"]
    counts = np.bincount(index, minlength=8)
    c = counts[index]
    assert new["fc1/kernel"].shape == (6, 13) and new["fc2/kernel"].shape == (13, 8)
    np.testing.assert_array_equal(new["fc1/kernel"], old["fc1/kernel"][:, index])
    np.testing.assert_allclose(new["fc2/kernel"], old["fc2/kernel"][index] / c[:, None], rtol=1e-6)
    # producer: first moment / count, second moment / count^2; consumer rows: copied
    m, v = "optimizer/fc1/kernel/momentum", "optimizer/fc1/kernel/velocity"
    np.testing.assert_allclose(new[m], old[m][:, index] / c, rtol=1e-6)
    np.testing.assert_allclose(new[v], old[v][:, index] / c ** 2, rtol=1e-6)
    np.testing.assert_array_equal(new["optimizer/fc2/kernel/velocity"],
                                  old["optimizer/fc2/kernel/velocity"][index])
    for k in ("out/kernel", "out/bias", "fc2/bias", "optimizer/out/kernel/momentum",
              "optimizer/fc2/bias/velocity", "optimizer/iteration", "optimizer/learning_rate"):
        assert np.array_equal(old[k], new[k]), k


def test_widen_reset_policy_zeroes_touched_slots(out_dir):
    out = out_dir / "widen_reset.keras"
    S.execute(S.plan_widen(src("mlp_adam"), "fc1", 10, slots="reset"), out)
    old, _ = tensors(src("mlp_adam"))
    new, _ = tensors(out)
    assert not new["optimizer/fc1/kernel/momentum"].any()
    assert not new["optimizer/fc2/kernel/velocity"].any()
    assert np.array_equal(new["optimizer/out/kernel/velocity"], old["optimizer/out/kernel/velocity"])


@pytest.mark.parametrize("key,name,planner,kw", [
    ("widen_convbn_conv2_flatten", "convbn_sgdm", S.plan_widen, dict(layer="conv2", to=9)),
    ("deepen_residual_add", "residual_rms", S.plan_deepen, dict(after="add")),
], ids=["widen_convbn", "deepen_residual"])
def test_trains_on_with_optimizer_state(made, key, name, planner, kw):
    _, out = made(key, planner, name, **kw)
    model = load_keras_model(out)
    it0 = int(model.optimizer.iterations.numpy())
    with open_checkpoint(src(name)) as ck:
        assert it0 == ck.metadata()["optimizer"]["iterations"] == 3
    x = inputs(name, 4)
    y = np.zeros((4, 3), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == it0 + 1


def test_deepen_new_layer_is_identity_with_zero_slots(made):
    _, out = made("deepen_convbn_relu1", S.plan_deepen, "convbn_sgdm", after="relu1")
    new, ents = tensors(out)
    k = new["relu1_deep/kernel"]
    assert k.shape == (3, 3, 4, 4)
    np.testing.assert_array_equal(k[1, 1], np.eye(4))
    assert not k[0].any() and not new["relu1_deep/bias"].any()
    assert not new["optimizer/relu1_deep/kernel/momentum"].any()
    old, _ = tensors(src("convbn_sgdm"))
    assert np.array_equal(old["optimizer/conv2/kernel/momentum"], new["optimizer/conv2/kernel/momentum"])
    assert load_keras_model(out).get_layer("relu1_deep").activation.__name__ == "relu"


def test_delete_channels_across_residual_branches(made):
    plan, out = made("delchan_residual_c2", S.plan_delete_channels, "residual_rms",
                     layer="c2", channels=[0, 3])
    assert set(plan.changed_layers) >= {"c2", "stem", "c1", "side", "head"}
    old, _ = tensors(src("residual_rms"))
    new, _ = tensors(out)
    keep = [1, 2]
    np.testing.assert_array_equal(new["stem/kernel"], old["stem/kernel"][..., keep])
    np.testing.assert_array_equal(new["c2/bias"], old["c2/bias"][keep])
    np.testing.assert_array_equal(new["c1/kernel"], old["c1/kernel"][:, :, keep, :])
    np.testing.assert_array_equal(new["side/kernel"], old["side/kernel"][:, :, keep, :])
    # head reads Concatenate([relu2 (4 -> 2 channels), side (2)]): offset map [1, 2, 4, 5]
    np.testing.assert_array_equal(new["head/kernel"], old["head/kernel"][[1, 2, 4, 5]])
    for slot in ("velocity", "momentum"):
        np.testing.assert_array_equal(new[f"optimizer/stem/kernel/{slot}"],
                                      old[f"optimizer/stem/kernel/{slot}"][..., keep])
        np.testing.assert_array_equal(new[f"optimizer/head/kernel/{slot}"],
                                      old[f"optimizer/head/kernel/{slot}"][[1, 2, 4, 5]])
    assert np.array_equal(new["bn1/gamma"], old["bn1/gamma"])
    model = load_keras_model(out)
    assert model(inputs("residual_rms"), training=False).shape == (5, 3)


def test_delete_channels_flatten_map_matches_zeroed_reference(made):
    """Deleting conv2 channels through bn2 -> relu2 -> Flatten equals the original model
    with those channels' head rows zeroed (checks the flatten index map exactly)."""
    plan, out = made("prune_convbn_conv2", S.plan_prune_channels, "convbn_sgdm",
                     layer="conv2", fraction=0.34)
    drop = plan.params["channels"]
    assert len(drop) == 2
    scores = S.channel_scores(src("convbn_sgdm"), "conv2")
    assert sorted(np.argsort(scores)[:2].tolist()) == drop
    ref = load_keras_model(src("convbn_sgdm"))
    head = ref.get_layer("head")
    k, b = [np.asarray(w) for w in head.get_weights()]
    k = k.reshape(16, 6, 3).copy()
    k[:, drop, :] = 0
    head.set_weights([k.reshape(96, 3), b])
    x = inputs("convbn_sgdm")
    assert_same_function(np.asarray(ref(x, training=False)), outputs(out, x))
    new, _ = tensors(out)
    assert new["bn2/moving_variance"].shape == (4,) and new["head/kernel"].shape == (64, 3)


def test_replace_layer_keeps_fitting_weights_and_slots(out_dir):
    out = out_dir / "replace_fc2.keras"
    spec = {"class_name": "Dense", "config": {"units": 8, "activation": "tanh"}}
    S.execute(S.plan_replace_layer(src("mlp_adam"), "fc2", spec), out)
    old, _ = tensors(src("mlp_adam"))
    new, _ = tensors(out)
    for k in old:
        assert np.array_equal(old[k], new[k]), k
    assert load_keras_model(out).get_layer("fc2").activation.__name__ == "tanh"


def test_delete_channels_refused_when_residual_branch_is_model_input(out_dir):
    out = out_dir / "never.keras"
    r = run_cli("delete-channels", src("skipinput_adam"), "--layer", "fc", "--channels", "1",
                "-o", out)
    assert r.exit_code == 2
    assert "branch add <- x" in r.output and "'x' (InputLayer)" in r.output
    assert not out.exists()


@pytest.mark.parametrize("args,msg", [
    (["widen", "mlp_adam", "--layer", "nope", "--to", "9"], "no layer named 'nope'; layers: fc1, fc2, out"),
    (["widen", "convbn_sgdm", "--layer", "bn1", "--to", "9"],
     "cannot widen 'bn1': it is a BatchNormalization layer; widen supports Dense, Conv1D, Conv2D, Conv3D"),
    (["widen", "mlp_adam", "--layer", "out", "--to", "9"], "reaches the model output 'out'"),
    (["widen", "mlp_adam", "--layer", "fc1", "--to", "4"], "--to must be larger"),
    (["delete-layer", "convbn_sgdm", "--layer", "conv2"], "cannot delete 'conv2': its output shape"),
    (["delete-channels", "convbn_sgdm", "--layer", "conv1", "--channels", "0,1,2,3"],
     "delete between 1 and 3 channels"),
    (["deepen", "convbn_sgdm", "--after", "conv1", "--activation", "relu"], "use --activation linear"),
    (["insert-layer", "mlp_adam", "--after", "fc1", "--layer-json",
      '{"class_name": "Lambda", "config": {}}'], "never runs code from configs"),
    (["insert-layer", "mlp_adam", "--after", "fc1", "--layer-json", '{"class_name": "Nope"}',
      "--name", "n"], "unknown Keras layer class 'Nope'"),
])
def test_bad_input_exit_2_no_output(out_dir, args, msg):
    out = out_dir / "bad.keras"
    r = run_cli(args[0], src(args[1]), *args[2:], "-o", out)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("surgeon: error: ") and msg in r.output, r.output
    assert not out.exists()
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]


def test_cli_dry_run_json_writes_nothing(out_dir):
    out = out_dir / "dry.keras"
    r = run_cli("widen", src("convbn_sgdm"), "--layer", "conv2", "--to", "8", "--dry-run",
                "--json", "-o", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["result"] is None and doc["plan"]["op"] == "widen"
    assert doc["plan"]["changed_layers"] == ["conv2", "bn2", "head"]
    targets = {a["target"]: a for a in doc["plan"]["actions"]}
    index = targets["conv2/kernel"]["steps"][0]["index"]
    assert len(index) == 8 and index[:6] == [0, 1, 2, 3, 4, 5]
    flat = targets["head/kernel"]["steps"][0]["index"]  # Flatten of (4, 4, C): s * 6 + c
    assert flat == [s * 6 + c for s in range(16) for c in index]
    assert not out.exists()


def test_cli_writes_and_reports(out_dir):
    out = out_dir / "cli_deep.keras"
    r = run_cli("deepen", src("mlp_adam"), "--after", "fc2", "-o", out)
    assert r.exit_code == 0, r.output
    assert "new layers: fc2_deep" in r.output and f"wrote {out}" in r.output
    x = inputs("mlp_adam")
    assert_same_function(outputs(src("mlp_adam"), x), outputs(out, x))


def test_every_command_has_help_example():
    from surgeon.cli.structure import COMMANDS
    for cmd in COMMANDS:
        assert "Example" in cmd.help and "surgeon " in cmd.help, cmd.name


def test_diff_reports_reshaped_and_equal(made):
    pytest.importorskip("surgeon.cli.inspect")
    _, out = made("widen_mlp_fc1", S.plan_widen, "mlp_adam", layer="fc1", to=13)
    r = run_cli("diff", src("mlp_adam"), out, "--json")
    doc = json.loads(r.output)
    rows = doc.get("tensors") or doc.get("entries") or doc.get("rows")
    status = {t["name"]: t["status"] for t in rows}
    assert status["fc1/kernel"] == "reshaped" and status["fc2/kernel"] == "reshaped"
    assert status["out/kernel"] == "equal" and status["optimizer/out/kernel/velocity"] == "equal"


def test_noise_touches_only_new_units_and_is_seeded(out_dir):
    outs = []
    for i in range(2):
        out = out_dir / f"noise{i}.keras"
        plan = S.plan_widen(src("mlp_adam"), "fc1", 12, seed=3, noise=0.05)
        assert any("approximately" in n for n in plan.notes)
        S.execute(plan, out)
        outs.append(tensors(out)[0])
    old, _ = tensors(src("mlp_adam"))
    k = outs[0]["fc1/kernel"]
    np.testing.assert_array_equal(k[:, :8], old["fc1/kernel"])
    assert not np.array_equal(k[:, 8:], old["fc1/kernel"][:, plan.actions["fc1/kernel"].steps[0]["index"][8:]])
    np.testing.assert_array_equal(k, outs[1]["fc1/kernel"])


def test_sequential_delete_layer_keeps_other_slots(out_dir):
    out = out_dir / "seq_delete_fc2.keras"
    S.execute(S.plan_delete_layer(src("mlp_adam"), "fc2"), out)
    old, _ = tensors(src("mlp_adam"))
    new, _ = tensors(out)
    assert set(old) - set(new) == {"fc2/kernel", "fc2/bias", *(f"optimizer/fc2/{v}/{s}" for v in
                                   ("kernel", "bias") for s in ("momentum", "velocity"))}
    for k in new:
        assert np.array_equal(old[k], new[k]), k
    assert [l.name for l in load_keras_model(out).layers] == ["fc1", "out"]
