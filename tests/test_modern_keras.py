"""Modern Keras 3 features: surgeon handles each exactly or refuses in one line.

Every model is built by tests/modern_zoo.py, trained a few steps and saved by Keras 3
(session temp dir); Keras itself is the oracle: its variable paths, ``trainable_variables``
and ``optimizer.variables``.
"""
import warnings

import numpy as np
import pytest

from conftest import ROOT, run_cli
from surgeon.formats import open_checkpoint

import modern_zoo


def _vars(model):
    return {v.path: np.asarray(v.numpy()) for v in model.variables}


def _slot_values(model):
    """canonical slot name -> value, from the optimizer's own variable paths."""
    opt = model.optimizer
    inner = getattr(opt, "inner_optimizer", opt)
    out = {}
    for v in inner.variables:
        for p in model.trainable_variables:
            stem = p.path.replace("/", "_") + "_"
            leaf = v.path.split("/")[-1]
            if leaf.startswith(stem):
                out[f"optimizer/{p.path}/{leaf[len(stem):]}"] = np.asarray(v.numpy())
    return out


# -- int8 quantized layers -------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["keras", "ckpt"])
def test_int8_names_roles_and_slots_match_keras(zoo, fmt):
    model, d = zoo("int8")
    path = d / ("int8.keras" if fmt == "keras" else "int8_ckpt")
    trainable = {v.path for v in model.trainable_variables}
    with open_checkpoint(path) as ck:
        by = {e.name: e for e in ck.entries()}
        for name, value in _vars(model).items():
            e = by[name]  # Keras' own variable name (fc1/kernel_scale), never positional
            assert e.role == ("param" if name in trainable else "state"), name
            assert bool(e.quant) == (name not in trainable), name
            np.testing.assert_array_equal(ck.read(name), value)
        slots = _slot_values(model)
        assert slots and {e.name for e in ck.entries() if e.role == "slot"} == set(slots)
        for name, value in slots.items():
            np.testing.assert_array_equal(ck.read(name), value)
        assert ck.metadata()["optimizer"]["iterations"] == int(model.optimizer.iterations)


def test_int8_rescale_is_refused_naming_the_layer(zoo, tmp_path):
    _, d = zoo("int8")
    out = tmp_path / "out.keras"
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'input = "{d / "int8.keras"}"\noutput = "{out}"\n'
                      '[[ops]]\nop = "rescale"\nselect = "fc1/*"\nfactor = 0.5\n')
    r = run_cli("apply", recipe)
    assert r.exit_code == 2 and "fc1" in r.output and "quantized" in r.output, r.output
    assert not out.exists()


def test_int8_bias_alone_can_be_edited(zoo, tmp_path):
    model, d = zoo("int8")
    out = tmp_path / "out.keras"
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'input = "{d / "int8.keras"}"\noutput = "{out}"\n'
                      '[[ops]]\nop = "rescale"\nselect = "fc1/bias"\nfactor = 0.5\n')
    r = run_cli("apply", recipe)
    assert r.exit_code == 0, r.output
    from conftest import load_keras_model
    got = _vars(load_keras_model(out))
    want = _vars(model)
    for name in want:
        scale = 0.5 if name == "fc1/bias" else 1.0
        np.testing.assert_allclose(got[name], want[name] * scale if scale != 1 else want[name])


def test_int8_convert_to_tf_checkpoint_matches_by_name(zoo, tmp_path):
    """TF's own restore into the same model gives every variable back (bias and
    kernel_scale have the same shape and used to be swapped)."""
    import keras
    import tensorflow as tf
    model, d = zoo("int8")
    out = tmp_path / "int8.ckpt"
    r = run_cli("convert", d / "int8.keras", out)
    assert r.exit_code == 0, r.output
    fresh = keras.saving.load_model(d / "int8.keras")
    for v in fresh.variables:
        v.assign(np.zeros(v.shape, v.dtype))
    tf.train.Checkpoint(model=fresh).read(str(out)).expect_partial()
    want = _vars(model)
    for name, value in _vars(fresh).items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_int4_is_named_or_refused_never_a_param(zoo):
    model, d = zoo("int4")
    trainable = {v.path for v in model.trainable_variables}
    with open_checkpoint(d / "int4.keras") as ck:
        for e in ck.entries():
            if e.role in ("param", "state"):
                assert (e.role == "param") == (e.name in trainable), e.name
                assert e.role == "param" or e.quant, e.name


# -- mixed precision: LossScaleOptimizer -----------------------------------------------

@pytest.mark.parametrize("fmt", ["keras", "ckpt"])
def test_loss_scale_optimizer_lists_the_inner_optimizer(zoo, fmt):
    model, d = zoo("mixed")
    opt = model.optimizer
    assert type(opt).__name__ == "LossScaleOptimizer"
    with open_checkpoint(d / ("mixed.keras" if fmt == "keras" else "mixed_ckpt")) as ck:
        meta = ck.metadata()["optimizer"]
        assert meta["iterations"] == int(opt.iterations.numpy()) > 0
        assert meta["learning_rate"] == pytest.approx(float(opt.learning_rate.numpy()))
        slots = _slot_values(model)
        assert {e.name for e in ck.entries() if e.role == "slot"} == set(slots)
        for name, value in slots.items():
            np.testing.assert_array_equal(ck.read(name), value)
        np.testing.assert_array_equal(ck.read("optimizer/loss_scale/dynamic_scale"),
                                      opt.dynamic_scale.numpy())
        np.testing.assert_array_equal(ck.read("optimizer/loss_scale/step_counter"),
                                      opt.step_counter.numpy())
        assert not any(e.name.startswith("optimizer/unresolved") for e in ck.entries())


def test_loss_scale_optimizer_inner_slot_edit_shows_and_loads(zoo, tmp_path):
    import keras
    model, d = zoo("mixed")
    out = tmp_path / "out.keras"
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'input = "{d / "mixed.keras"}"\noutput = "{out}"\n'
                      '[[ops]]\nop = "rescale"\nselect = "optimizer/fc1/kernel/momentum"\n'
                      'factor = 2.0\n')
    assert run_cli("apply", recipe).exit_code == 0
    r = run_cli("diff", d / "mixed.keras", out)
    assert "momentum" in r.output and "changed" in r.output, r.output
    want = _slot_values(model)["optimizer/fc1/kernel/momentum"] * 2
    with open_checkpoint(out) as ck:  # both stored copies of the inner optimizer agree
        e = ck.entry("optimizer/fc1/kernel/momentum")
        for key in (e.key, *ck.mirrors[e.key]):
            np.testing.assert_array_equal(ck.read_key(key), want)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = keras.saving.load_model(out)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    np.testing.assert_array_equal(_slot_values(loaded)["optimizer/fc1/kernel/momentum"], want)
    assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())


# -- unbound slots, EMA, gradient accumulation -----------------------------------------

def _recipe(tmp_path, src, op_lines):
    out = tmp_path / "out.keras"
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'input = "{src}"\noutput = "{out}"\n[[ops]]\n' + op_lines)
    return recipe, out


@pytest.mark.parametrize("name,why", [("adafactor", "factored"), ("lora", "not bound")])
def test_slot_policy_that_cannot_be_honoured_is_an_error(zoo, tmp_path, name, why):
    _, d = zoo(name)
    recipe, out = _recipe(tmp_path, d / f"{name}.keras",
                          'op = "rescale"\nselect = "fc2/kernel"\nfactor = 2.0\nslots = "follow"\n')
    r = run_cli("apply", recipe)
    assert r.exit_code == 2 and why in r.output, r.output
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["keras", "ckpt"])
def test_adafactor_factored_slots_bound_like_keras(zoo, fmt):
    model, d = zoo("adafactor")
    opt = model.optimizer
    want = {}
    for i, p in enumerate(model.trainable_variables):
        for kind, lst in (("r", opt._r), ("c", opt._c), ("velocity", opt._v)):
            want[f"optimizer/{p.path}/{kind}"] = np.asarray(lst[i].numpy())
    path = d / ("adafactor.keras" if fmt == "keras" else "adafactor_ckpt")
    if fmt == "ckpt":  # correct, or a clean one-line refusal (r/c carry only the param's name)
        r = run_cli("ls", path)
        if r.exit_code == 2:
            assert r.output.startswith("surgeon: error:") and len(r.output.splitlines()) == 1
            return
    with open_checkpoint(path) as ck:
        got = {e.name for e in ck.entries() if e.role == "slot"}
        assert got == set(want)
        for n, value in want.items():
            np.testing.assert_array_equal(ck.read(n), value)


def test_adafactor_convert_to_weights_h5_loads_in_keras(zoo, tmp_path):
    import keras
    model, d = zoo("adafactor")
    out = tmp_path / "ada.weights.h5"
    r = run_cli("convert", d / "adafactor.keras", out)
    assert r.exit_code == 0, r.output
    fresh = keras.saving.load_model(d / "adafactor.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_weights(out)
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()), err_msg=a.path)


@pytest.mark.parametrize("name", ["ema", "accum"])
def test_ema_and_accumulator_slots_bound_like_keras(zoo, name):
    model, d = zoo(name)
    with open_checkpoint(d / f"{name}.keras") as ck:
        slots = _slot_values(model)
        kinds = {n.rsplit("/", 1)[-1] for n in slots}
        assert kinds >= ({"average"} if name == "ema" else {"gradient_accumulator"})
        assert {e.name for e in ck.entries() if e.role == "slot"} == set(slots)
        for n, value in slots.items():
            np.testing.assert_array_equal(ck.read(n), value)
        assert ck.metadata()["optimizer"]["iterations"] == int(model.optimizer.iterations.numpy())


def test_ema_copy_restarts_at_the_reset_weight(zoo, tmp_path):
    _, d = zoo("ema")
    recipe, out = _recipe(tmp_path, d / "ema.keras",
                          'op = "reinit"\nselect = "fc2/kernel"\nseed = 3\nslots = "reset"\n')
    assert run_cli("apply", recipe).exit_code == 0
    with open_checkpoint(out) as ck:
        np.testing.assert_array_equal(ck.read("optimizer/fc2/kernel/average"),
                                      ck.read("fc2/kernel"))
        assert not ck.read("optimizer/fc2/kernel/momentum").any()


# -- preprocessing: adapted Normalization, lookup vocabularies (assets) ------------------

def _keras_fit_on(path, steps):
    import keras
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = keras.saving.load_model(path)
    m.fit(modern_zoo.X, modern_zoo.Y, batch_size=8, epochs=steps // 2, verbose=0, shuffle=False)
    return m


def test_resume_finalizes_adapted_normalization_like_keras(zoo, tmp_path):
    from surgeon.train.loop import resume
    _, d = zoo("norm")
    want = _keras_fit_on(d / "norm.keras", 4)
    res = resume(d / "norm.keras", data=(modern_zoo.X, modern_zoo.Y), steps=4, batch_size=8,
                 output=None)
    got = _vars(res.model)
    for name, value in _vars(want).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(res.model.get_layer("norm").mean),
                               np.asarray(want.get_layer("norm").mean), rtol=1e-6)


def test_convert_carries_vocabularies_and_diff_audit_see_assets(zoo, tmp_path):
    import keras
    _, d = zoo("text")
    src = d / "text.keras"
    out = tmp_path / "text.keras"
    r = run_cli("convert", src, out)
    assert r.exit_code == 0, r.output
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = keras.saving.load_model(src), keras.saving.load_model(out)
    assert a.get_layer("tv").get_vocabulary() == b.get_layer("tv").get_vocabulary()
    assert len(b.get_layer("tv").get_vocabulary()) > 2
    assert run_cli("diff", src, out).output.startswith("equal")
    # a .keras whose vocabulary was lost: diff and audit must say so
    broken = tmp_path / "broken.keras"
    import zipfile
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(broken, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, b"[UNK]\n" if info.filename.endswith("vocabulary.txt") else data)
    r = run_cli("diff", src, broken)
    assert not r.output.startswith("equal") and "asset" in r.output, r.output
    r = run_cli("audit", broken)
    assert "empty-vocabulary" in r.output and "healthy" not in r.output, r.output


def test_convert_refuses_assets_a_weights_file_cannot_hold(zoo, tmp_path):
    _, d = zoo("text")
    out = tmp_path / "text.weights.h5"
    r = run_cli("convert", d / "text.keras", out)
    assert r.exit_code == 2 and "assets" in r.output, r.output
    assert not out.exists()


def test_resume_of_lookup_model_loads_its_vocabulary(zoo, tmp_path):
    import tensorflow as tf
    from surgeon.train.loop import resume
    _, d = zoo("text")
    data = tf.data.Dataset.from_tensor_slices(
        (tf.constant(modern_zoo.TEXTS.reshape(-1, 1)), np.ones((4, 1), "float32"))).batch(2)
    res = resume(d / "text.keras", data=data, steps=2, output=tmp_path / "more.keras")
    assert len(res.model.get_layer("tv").get_vocabulary()) > 2
    with open_checkpoint(tmp_path / "more.keras") as ck:
        assert ck.metadata()["optimizer"]["iterations"] == 4


# -- Nadam resume, LoRA ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["nadam", "int8", "int4", "ema", "accum", "adafactor"])
def test_resume_continues_like_keras(zoo, name):
    from surgeon.train.loop import resume
    _, d = zoo(name)
    want = _keras_fit_on(d / f"{name}.keras", 4)
    res = resume(d / f"{name}.keras", data=(modern_zoo.X, modern_zoo.Y), steps=4, batch_size=8)
    got = _vars(res.model)
    for n, value in _vars(want).items():
        np.testing.assert_allclose(got[n], value, rtol=1e-5, atol=1e-6, err_msg=n)
    for a, b in zip(res.model.optimizer.variables, want.optimizer.variables):
        np.testing.assert_allclose(np.asarray(a.numpy()), np.asarray(b.numpy()), rtol=1e-5,
                                   atol=1e-6, err_msg=a.path)


def test_lora_base_kernel_is_frozen_like_keras(zoo):
    model, d = zoo("lora")
    trainable = {v.path for v in model.trainable_variables}
    assert "fc1/kernel" not in trainable
    with open_checkpoint(d / "lora.keras") as ck:
        for e in ck.entries():
            if e.role == "param" and not e.frozen:
                assert e.name in trainable, e.name
        assert ck.entry("fc1/kernel").frozen


def _with_unknown_quantization(src, dst):
    """``src`` (an int8 model saved by Keras) with its layers' quantization mode renamed to
    one surgeon has no layout for ("gptq"): the variables stay as Keras stored them."""
    import json
    import zipfile

    def rename(o):
        if isinstance(o, dict):
            if o.get("mode") == "int8":
                o["mode"] = "gptq"
            for v in o.values():
                rename(v)
        elif isinstance(o, list):
            for v in o:
                rename(v)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "config.json":
                cfg = json.loads(data)
                rename(cfg)
                data = json.dumps(cfg).encode()
            zout.writestr(info, data)


def test_unknown_quantized_layout_listed_by_position_and_resume_refused(zoo, tmp_path):
    _, d = zoo("int8")
    odd = tmp_path / "gptq.keras"
    _with_unknown_quantization(d / "int8.keras", odd)
    with open_checkpoint(odd) as ck:
        quant = [e for e in ck.entries() if e.quant]
        assert quant and all(e.quant == "gptq" and e.role == "state" for e in quant)
        assert all(e.name.rsplit("/", 1)[-1].isdigit() for e in quant)  # by position, never guessed
    out = tmp_path / "more.keras"
    res = run_cli("resume", odd, "--data", f"{ROOT / 'tests' / 'modern_zoo.py'}:xy", "--steps", "1",
                  "--batch-size", "8", "-o", out)
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "surgeon: error:" in res.output and "quantized layout (gptq)" in res.output, res.output
    assert not out.exists()
