"""``surgeon merge`` and the ``merge`` recipe op on real models: a tiny digits MLP (base) and
two fine-tunes on two tasks (benchmarks/merge_tasks.py), saved by Keras as .keras and a TF
checkpoint. Identities are exact; merged values match numpy on Keras-loaded weights; Keras
loads every output without warnings; refusals write nothing."""
import json
import sys

import numpy as np
import pytest

from conftest import ROOT, load_keras_model, run_cli
from surgeon.formats.provenance import input_digest

sys.path.insert(0, str(ROOT / "benchmarks"))
import merge_tasks  # noqa: E402

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    paths = merge_tasks.make_models(d)
    import keras
    m = merge_tasks._build(keras)
    odd = keras.Model(m.input, keras.layers.Dense(7, name="head")(m.get_layer("bn").output))
    odd.compile(optimizer="adam", loss="mse")
    odd.save(d / "odd_head.keras")  # head 32x7 instead of 32x10
    inp = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(32, activation="relu", name="fc1")(inp)
    nobn = keras.Model(inp, keras.layers.Dense(10, name="head")(h))
    nobn.compile(optimizer="adam", loss="mse")
    nobn.save(d / "no_bn.keras")
    return paths | {"odd": d / "odd_head.keras", "nobn": d / "no_bn.keras", "dir": d}


def weights(path):
    """{canonical name: value} as Keras loads them (no warnings allowed)."""
    model = load_keras_model(path)
    return {v.path: np.asarray(v.numpy()) for v in model.weights}, model


def tensors(path):
    from surgeon.formats import open_checkpoint
    with open_checkpoint(path) as ck:
        return {e.name: np.asarray(ck.read(e.name)) for e in ck.entries()}


def merge(zoo, *args, out="m.keras"):
    target = zoo["dir"] / out
    res = run_cli("merge", *args, "-o", target)
    assert res.exit_code == 0, res.output
    return target


MERGED = ["fc1/kernel", "fc1/bias", "bn/gamma", "bn/beta", "head/kernel", "head/bias"]


def test_identities_are_exact(zoo):
    a, b, base = zoo["ft_a"], zoo["ft_b"], zoo["base"]
    wa, _ = weights(a)
    wb, _ = weights(b)
    cases = [  # (arguments, expected weights)
        (["--method", "linear", a, a, a], wa),
        (["--method", "ties", "--density", "1", "--base", base, a, a], wa),
        (["--method", "model_stock", "--base", base, a, a], wa),
        (["--method", "task_arithmetic", "--scale", "1", "--base", base, a], wa),
        (["--method", "slerp", "--t", "0", a, b], wa),
        (["--method", "slerp", "--t", "1", a, b], wb),
    ]
    for i, (args, want) in enumerate(cases):
        out = merge(zoo, *args, out=f"id{i}.keras")
        got = weights(out)[0] if i == 0 else tensors(out)  # Keras loads one; the rest as stored
        for n in MERGED:
            assert np.array_equal(got[n], want[n]), (args[:2], n)
    dare = tensors(merge(zoo, "--method", "dare", "--p", "0", "--base", base, a, b, out="d0.keras"))
    ta = tensors(merge(zoo, "--method", "task_arithmetic", "--base", base, a, b, out="ta.keras"))
    for n in MERGED:
        assert np.array_equal(dare[n], ta[n]), n


def test_values_state_rule_optimizer_and_log(zoo):
    a, b = zoo["ft_a"], zoo["ft_b"]
    out = merge(zoo, "--weight", "0.3,0.7", a, b, out="lin.keras")
    got, model = weights(out)
    wa, ma = weights(a)
    wb, _ = weights(b)
    for n in MERGED:
        np.testing.assert_allclose(got[n], 0.3 * wa[n] + 0.7 * wb[n], rtol=1e-6, atol=1e-7)
    for n in ("bn/moving_mean", "bn/moving_variance"):  # state: the template's (first model)
        assert np.array_equal(got[n], wa[n])
    assert int(model.optimizer.iterations.numpy()) == 0  # a fresh optimizer
    assert all(not np.any(v.numpy()) for v in model.optimizer.variables
               if "/m" in v.path or "/v" in v.path or "momentum" in v.path or "velocity" in v.path)
    model.predict(np.zeros((2, 64), "float32"), verbose=0)
    log = json.loads(run_cli("log", out, "--json").output)[-1]
    assert log["command"] == "merge"
    steps = {s["target"]: s["detail"] for s in log["plan"]["steps"]}
    assert steps["head/kernel"] == {"method": "linear", "normalize": True, "weight": [0.3, 0.7]}
    hashed = {i["path"] for i in log["inputs"] if input_digest(i)}
    assert hashed == {str(a), str(b)}
    assert any("fresh optimizer" in n for n in log["plan"]["notes"])
    # --state average: the plain mean of the models' statistics
    avg = tensors(merge(zoo, "--state", "average", a, b, out="avg.keras"))
    np.testing.assert_allclose(avg["bn/moving_mean"], (wa["bn/moving_mean"] + wb["bn/moving_mean"]) / 2,
                               rtol=1e-6)
    # --optimizer-from: the template is that input, its optimizer state kept as stored
    kept = merge(zoo, "--optimizer-from", b, a, b, out="keep.keras")
    tb, tk = tensors(b), tensors(kept)
    slots = [n for n in tb if n.startswith("optimizer/")]
    assert slots and all(np.array_equal(tb[n], tk[n]) for n in slots)
    weights(kept)


def test_cross_format_and_per_pattern_override(zoo):
    a, b = zoo["ft_a"], zoo["ft_b"]
    same = tensors(merge(zoo, "--method", "slerp", a, zoo["ft_b_ckpt"], out="x.keras"))
    want = tensors(merge(zoo, "--method", "slerp", a, b, out="y.keras"))
    for n in MERGED:
        assert np.array_equal(same[n], want[n]), n
    over = tensors(merge(zoo, "--method", "slerp", "--set", "head/*:t=1", a, b, out="o.keras"))
    tb = tensors(b)
    assert np.array_equal(over["head/kernel"], tb["head/kernel"])
    assert np.array_equal(over["fc1/kernel"], want["fc1/kernel"])


def test_dry_run_and_json(zoo):
    out = zoo["dir"] / "dry.keras"
    res = run_cli("merge", "--base", zoo["base"], zoo["ft_a"], zoo["ft_b"], "--method", "ties",
                  "--density", "0.5", "-o", out, "--dry-run")
    assert res.exit_code == 0 and not out.exists()
    assert "merge          head/kernel  32x10 float32  combine" not in res.output
    assert "density=[0.5, 0.5], method=ties, scale=1.0, weight=[1.0, 1.0]" in res.output
    assert "fresh optimizer" in res.output and "dry run: nothing written" in res.output
    res = run_cli("merge", zoo["ft_a"], zoo["ft_b"], "-o", out, "--dry-run", "--json")
    plan = json.loads(res.output)["plan"]
    assert {s["target"] for s in plan["steps"]} == set(MERGED)


@pytest.mark.parametrize("which,msg", [
    ("odd", "head/kernel has shape (32, 7) in {p} but (32, 10) in {a}"),
    ("nobn", "bn/gamma is missing from {p}"),
])
def test_refusals_write_nothing(zoo, which, msg):
    out = zoo["dir"] / f"refused_{which}.keras"
    res = run_cli("merge", zoo["ft_a"], zoo[which], "-o", out)
    assert res.exit_code == 2
    assert res.output.startswith("surgeon: error: surgeon merge: op 'merge': ")
    assert msg.format(p=zoo[which], a=zoo["ft_a"]) in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()
    assert not list(zoo["dir"].glob("*surgeon-tmp*"))


def test_bad_parameters_are_one_line(zoo):
    res = run_cli("merge", zoo["ft_a"], zoo["ft_b"], "--method", "ties", "-o", zoo["dir"] / "t.keras")
    assert res.exit_code == 2 and "needs base=" in res.output
    res = run_cli("merge", zoo["ft_a"], zoo["ft_b"], "--method", "slerp", "--set", "nothing/*:t=1",
                  "-o", zoo["dir"] / "t.keras")
    assert res.exit_code == 2 and "'nothing/*' matches no merged tensor" in res.output


def test_recipe_op_py_and_toml(zoo, tmp_path):
    from surgeon.recipe import apply_overrides, load_recipe
    from surgeon.recipe.execute import apply
    a, b, base = zoo["ft_a"], zoo["ft_b"], zoo["base"]
    py = tmp_path / "m.py"
    py.write_text("from surgeon.recipe import recipe, merge\n"
                  f"RECIPE = recipe(input={str(base)!r}, output={str(tmp_path / 'py.keras')!r},\n"
                  f"    ops=[merge([{str(a)!r}, {str(b)!r}], base='input', method='ties', density=0.5,\n"
                  "               overrides={'head/*': {'density': 1.0}})], iteration='reset')\n")
    toml = tmp_path / "m.toml"
    toml.write_text(f'input = "{base}"\noutput = "{tmp_path / "toml.keras"}"\niteration = "reset"\n'
                    f'[[ops]]\nop = "merge"\nmodels = ["{a}", "{b}"]\nbase = "input"\n'
                    'method = "ties"\ndensity = 0.5\noverrides = { "head/*" = { density = 1.0 } }\n')
    cli = tensors(merge(zoo, "--base", base, a, b, "--method", "ties", "--density", "0.5",
                        "--set", "head/*:density=1", out="cli.keras"))
    for rec in (py, toml):
        plan, _ = apply(apply_overrides(load_recipe(rec)))
        got = tensors(plan.output)
        for n in MERGED:
            assert np.array_equal(got[n], cli[n]), (rec.suffix, n)
        weights(plan.output)


def test_merged_model_does_both_tasks(zoo):
    """The end-to-end case: each fine-tune forgets the other task; the merge does both."""
    s = {k: merge_tasks.scores(zoo[k]) for k in ("base", "ft_a", "ft_b")}
    s["merged"] = merge_tasks.scores(merge(zoo, zoo["ft_a"], zoo["ft_b"], out="e2e.keras"))
    ta, tb = merge_tasks.TASKS
    assert s["ft_a"][ta] > 0.9 and s["ft_b"][tb] > 0.9  # each learned its task
    assert s["ft_a"][tb] < 0.5 and s["ft_b"][ta] < 0.5  # ... and forgot the other
    worst = {k: min(v.values()) for k, v in s.items()}
    assert worst["merged"] > max(worst["ft_a"], worst["ft_b"]) + 0.3, s


# -- LoRA: merge (fold) and extract/load by layer path -----------------------------------------

@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A tiny MLP with LoRA on fc1 (rank 4) and head (rank 2, alpha 4), trained a few Adam
    steps: .keras and TF checkpoint (independent of the digits models: cheap alone)."""
    import keras
    import tensorflow as tf
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 8)).astype("float32"), rng.random((64, 3)).astype("float32")
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), name="x")
    h = keras.layers.Dense(6, activation="relu", name="fc1")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(h), name="lora_mlp")
    model.get_layer("fc1").enable_lora(4)
    model.get_layer("head").enable_lora(2, lora_alpha=4)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    d = tmp_path_factory.mktemp("lora")
    model.save(d / "lora.keras")
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(d / "lora_ckpt" / "ckpt"))
    return {"model": model, "keras": d / "lora.keras", "ckpt": d / "lora_ckpt", "x": x,
            "iterations": int(model.optimizer.iterations.numpy()), "dir": d}


@pytest.mark.parametrize("src", ["keras", "ckpt"])
def test_lora_merge_gives_a_plain_model_with_the_same_outputs(lora, src):
    out = lora["dir"] / f"plain_{src}.keras"
    like = ["--like", lora["keras"]] if src == "ckpt" else []
    res = run_cli("lora", "merge", lora[src], *like, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert [x["layer"] for x in rep["layers"]] == ["fc1", "head"]
    assert len(rep["dropped_slots"]) == 8 and len(rep["zeroed_slots"]) == 4
    _, plain = weights(out)
    want = np.asarray(lora["model"](lora["x"], training=False))
    np.testing.assert_allclose(np.asarray(plain(lora["x"], training=False)), want, atol=1e-5)
    assert "lora_rank" not in json.dumps(plain.get_config())
    assert {"fc1/kernel", "head/kernel"} <= {v.path for v in plain.trainable_variables}
    assert int(plain.optimizer.iterations.numpy()) == lora["iterations"]
    assert "healthy, no findings" in run_cli("audit", out).output


def test_lora_merge_refusals(lora):
    plain = lora["dir"] / "plain_keras.keras"
    if not plain.exists():
        run_cli("lora", "merge", lora["keras"], "-o", plain)
    res = run_cli("lora", "merge", plain, "-o", lora["dir"] / "p.keras")
    assert res.exit_code == 2 and "no layer has LoRA enabled" in res.output
    res = run_cli("lora", "merge", lora["ckpt"], "-o", lora["dir"] / "p.keras")
    assert res.exit_code == 2 and "pass --like" in res.output
    assert not (lora["dir"] / "p.keras").exists()


def test_lora_extract_and_load_by_layer_path(zoo):
    import keras
    import surgeon.keras
    x = merge_tasks.data()[2][:64]
    want = np.asarray(keras.saving.load_model(zoo["ft_a"])(x, training=False))
    full = zoo["dir"] / "full.npz"
    res = run_cli("lora", "extract", "--base", zoo["base"], zoo["ft_a"], "--rank", 64, "-o", full,
                  "--json")
    meta = json.loads(res.output)
    assert {(x["layer"], x["rank"]) for x in meta["layers"]} == {("fc1", 32), ("head", 10)}
    assert max(x["rel_error"] for x in meta["layers"]) < 1e-6
    model = surgeon.keras.load_lora(keras.saving.load_model(zoo["base"]), full)
    assert model.get_layer("fc1").lora_enabled
    np.testing.assert_allclose(np.asarray(model(x, training=False)), want, atol=1e-5)
    low = zoo["dir"] / "low.npz"
    meta = json.loads(run_cli("lora", "extract", "--base", zoo["base"], zoo["ft_a"], "--rank", 2,
                              "-o", low, "--json").output)
    assert all(0 < x["rel_error"] < 1 for x in meta["layers"])
    inp = keras.Input((64,), name="pixels")
    other = keras.Model(inp, keras.layers.Dense(10, name="fc9")(inp))
    with pytest.raises(surgeon.SurgeonError, match="adapter layer 'fc1' does not exist in model"):
        surgeon.keras.load_lora(other, low)


@pytest.mark.parametrize("src", ["keras", "ckpt"])
def test_lora_merge_of_einsum_dense_inside_a_nested_model(tmp_path, src):
    """LoRA on an EinsumDense with a 3-D kernel (factors (8, 3, r) and (r, 2)), held by a
    nested functional model: the merged plain model gives the LoRA model's outputs, from
    the .keras and from a TF checkpoint with --like."""
    import keras
    import tensorflow as tf
    rng = np.random.default_rng(1)
    x, y = rng.random((32, 8)).astype("float32"), rng.random((32, 3)).astype("float32")
    keras.utils.set_random_seed(1)
    ii = keras.Input((8,), name="inner_in")
    e = keras.layers.EinsumDense("ab,bcd->acd", output_shape=(3, 2), bias_axes="d", name="ein")(ii)
    inner = keras.Model(ii, keras.layers.Flatten(name="flat")(e), name="inner")
    inp = keras.Input((8,), name="x")
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(inner(inp)), name="ein_lora")
    inner.get_layer("ein").enable_lora(2, lora_alpha=3)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    model.save(tmp_path / "ein.keras")
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / "ck" / "ckpt"))
    source = tmp_path / "ein.keras" if src == "keras" else tmp_path / "ck"
    like = ["--like", tmp_path / "ein.keras"] if src == "ckpt" else []
    out = tmp_path / "plain.keras"
    res = run_cli("lora", "merge", source, *like, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    assert [x["layer"] for x in json.loads(res.output)["layers"]] == ["ein"]
    plain = load_keras_model(out)
    assert "lora_rank" not in json.dumps(plain.get_config())
    ein = plain.get_layer("inner").get_layer("ein")
    kernel = inner.get_layer("ein")
    want_kernel = np.asarray(kernel._kernel) + 1.5 * np.einsum(
        "bcr,rd->bcd", np.asarray(kernel.lora_kernel_a), np.asarray(kernel.lora_kernel_b))
    np.testing.assert_allclose(np.asarray(ein.kernel), want_kernel, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(plain(x, training=False)),
                               np.asarray(model(x, training=False)), atol=1e-5)
    assert int(plain.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
