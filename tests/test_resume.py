"""resume: exact restore, exact continuation, fit/bad-input reports, masks, slots, CLI.

What "exact" compares: two checkpoints written by surgeon's writer after training the same
model from the same checkpoint on the same batches -- (a) N steps in one resume, (b) k steps,
save, an identity rewrite that decodes and re-encodes every tensor through surgeon's writer,
then N-k steps in a fresh resume (a fresh model, a fresh optimizer, restored from the file).
Every tensor (weights, BatchNorm statistics, frozen layer, every optimizer slot, iteration,
learning rate) must be bit-identical. Both runs use the same loop; a separate test shows that
loop is bit-identical to Keras' own model.fit on the same data.
"""
import json
import os

import numpy as np
import pytest

from conftest import fixture, load_keras_model, run_cli
from surgeon import open_checkpoint, open_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "recipes", "example_data.py")
OPTIMIZERS = {
    "adam": ("Adam", {"learning_rate": 0.01}),
    "adamw": ("AdamW", {"learning_rate": 0.01, "weight_decay": 0.01}),
    "sgdm": ("SGD", {"learning_rate": 0.05, "momentum": 0.9}),
    "rmsprop": ("RMSprop", {"learning_rate": 0.01, "momentum": 0.5, "centered": True}),
    "adagrad": ("Adagrad", {"learning_rate": 0.1}),
}


@pytest.fixture(scope="session", autouse=True)
def deterministic():
    import tensorflow as tf
    tf.config.experimental.enable_op_determinism()


@pytest.fixture(scope="session")
def cnn_ckpts(tmp_path_factory):
    """A CNN (BatchNorm + a frozen Dense) trained 3 steps with each optimizer, as .keras."""
    import keras
    import make_fixtures
    d = tmp_path_factory.mktemp("cnn")
    out = {}
    for key, (cls, kw) in OPTIMIZERS.items():
        keras.utils.set_random_seed(0)
        model = make_fixtures.build_cnn()
        model.compile(getattr(keras.optimizers, cls)(**kw), "sparse_categorical_crossentropy")
        model.optimizer.build(model.trainable_variables)
        model.optimizer.iterations.assign(3)  # as if 3 batches were consumed (fresh slots)
        out[key] = d / f"cnn_{key}.keras"
        model.save(out[key])
    return out


def tensors(path, model=None):
    with open_checkpoint(path, model=model) as ck:
        return {e.name: ck.read(e.name) for e in ck.entries()}


def identity_rewrite(src, dst, model=None):
    """Decode and re-encode every tensor through surgeon's writer."""
    with open_checkpoint(src, model=model) as ck, open_writer(dst, like=ck) as w:
        for e in ck.entries():
            w.write(e.name, np.array(ck.read(e.name)))
        w.finalize()


def run(ckpt, steps, out, data="cnn_data", **kw):
    from surgeon.train import resume
    return resume(str(ckpt), data=f"{DATA}:{data}", steps=steps, output=str(out), **kw)


def assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_split_resume_is_bit_identical(opt, cnn_ckpts, tmp_path):
    src = cnn_ckpts[opt]
    ref = run(src, 6, tmp_path / "ck_{iteration}.keras", every=2)  # saves at 5, 7, 9
    assert (ref.iteration_start, ref.iteration_end) == (3, 9)
    assert [os.path.basename(c) for c in ref.checkpoints] == ["ck_5.keras", "ck_7.keras", "ck_9.keras"]
    identity_rewrite(tmp_path / "ck_5.keras", tmp_path / "part_rw.keras")
    rest = run(tmp_path / "part_rw.keras", 4, tmp_path / "rest.keras")
    assert (rest.iteration_start, rest.iteration_end) == (5, 9)
    a, b = tensors(tmp_path / "ck_9.keras"), tensors(tmp_path / "rest.keras")
    assert_bit_identical(a, b)
    before = tensors(src)
    assert int(a["optimizer/iteration"]) == 9
    slots = [n for n in a if n.startswith("optimizer/") and n.count("/") > 1]
    assert slots and all(e not in n for n in slots for e in ("frozen/",))
    assert not np.array_equal(before["head/kernel"], a["head/kernel"])  # it trained
    assert not np.array_equal(before["bn/moving_mean"], a["bn/moving_mean"])  # BN stats moved
    np.testing.assert_array_equal(before["frozen/kernel"], a["frozen/kernel"])  # frozen stayed
    # every slot moved, except conv1/bias's under Adagrad: BatchNorm right after conv1
    # makes that bias's gradient exactly zero, so its accumulator cannot change
    moved = {n for n in slots if not np.array_equal(before[n], a[n])}
    assert set(slots) - moved <= {"optimizer/conv1/bias/accumulator"}


def test_split_resume_through_weights_h5(tmp_path):
    """The same exactness when the middle checkpoint is a bare .weights.h5 plus --model."""
    src, model = fixture("nested_adamw.weights.h5"), fixture("nested_adamw.keras")
    run(src, 5, tmp_path / "ck{iteration}.weights.h5", data="nested_data", model=model, every=2)
    identity_rewrite(tmp_path / "ck5.weights.h5", tmp_path / "b.weights.h5", model=model)
    run(tmp_path / "b.weights.h5", 3, tmp_path / "c.weights.h5", data="nested_data", model=model)
    assert_bit_identical(tensors(tmp_path / "ck8.weights.h5", model),
                         tensors(tmp_path / "c.weights.h5", model))


def test_loop_is_bit_identical_to_model_fit(tmp_path):
    """Keras as the oracle: model.fit on the same batches gives the same bits."""
    import keras
    import tensorflow as tf
    import example_data_mod as ed
    res = run(fixture("cnn_adam.keras"), 4, tmp_path / "ours.keras")
    model = load_keras_model(fixture("cnn_adam.keras"))
    ds = ed.cnn_data().repeat().skip(3).take(4)  # the fixture consumed 3 batches
    model.fit(ds, epochs=1, verbose=0, shuffle=False)
    ours = tensors(tmp_path / "ours.keras")
    with open_checkpoint(fixture("cnn_adam.keras")) as ck:
        names = [e.name for e in ck.entries() if e.role in ("param", "state")]
    keras_vals = [v.numpy() for v in model.weights]
    assert [ours[n].tobytes() for n in names] == [a.tobytes() for a in keras_vals]
    opt = [e.name for e in open_checkpoint(fixture("cnn_adam.keras")).entries()
           if e.role in ("slot", "optimizer")]
    assert [ours[n].tobytes() for n in opt] == [v.numpy().tobytes() for v in model.optimizer.variables]
    assert res.iteration_end == int(model.optimizer.iterations) == 7
    del keras, tf


@pytest.fixture(scope="module", autouse=True)
def _example_data_module():
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location("example_data_mod", DATA)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["example_data_mod"] = mod


def test_output_loads_in_keras_and_continues_iteration(tmp_path):
    res = run(fixture("lstm_adam.keras"), 3, tmp_path / "out.keras", data="lstm_data")
    model = load_keras_model(tmp_path / "out.keras")  # fails on any warning
    assert int(model.optimizer.iterations) == 6 == res.iteration_end
    with open_checkpoint(tmp_path / "out.keras") as ck:
        assert ck.metadata()["optimizer"]["iterations"] == 6
        vh = ck.read("optimizer/lstm/lstm_cell/kernel/velocity_hat")
    kv = [v for v in model.optimizer.variables if v.name == "lstm_lstm_cell_kernel_velocity_hat"]
    np.testing.assert_array_equal(vh, kv[0].numpy())


# -- bad input ---------------------------------------------------------------------------

def wrong_head():
    import keras
    import make_fixtures
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    base = make_fixtures.build_cnn()
    x = base.get_layer("frozen")(base.get_layer("gap")(base.get_layer("conv2")(
        base.get_layer("relu")(base.get_layer("bn")(base.get_layer("conv1")(inp))))))
    out = keras.layers.Dense(5, name="head")(x)
    m = keras.Model(inp, out)
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return m


def cnn_with_sgd():
    import keras
    import make_fixtures
    m = make_fixtures.build_cnn()
    m.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    return m


def cnn_with_extra_layer():
    import keras
    import make_fixtures
    base = make_fixtures.build_cnn()
    out = keras.layers.Dense(3, name="extra")(base.output)
    m = keras.Model(base.input, out)
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return m


def test_shape_mismatch_is_reported_before_any_step(tmp_path):
    from surgeon.train import FitError
    out = tmp_path / "out.keras"
    with pytest.raises(FitError) as exc:
        run(fixture("cnn_adam.keras"), 3, out, model=f"{__file__}:wrong_head")
    rep = exc.value.report
    assert ("head/kernel", (6, 3), (6, 5)) in rep.mismatched
    assert ("optimizer/head/kernel/momentum", (6, 3), (6, 5)) in rep.mismatched
    assert not out.exists()
    r = run_cli("resume", fixture("cnn_adam.keras"), "--data", f"{DATA}:cnn_data", "--steps", 2,
                "-o", out, "--model", f"{__file__}:wrong_head")
    assert r.exit_code == 2 and not out.exists()
    assert "shape mismatch: head/kernel: checkpoint [6, 3], model [6, 5]" in r.output


def test_optimizer_of_another_kind(tmp_path):
    from surgeon.train import FitError
    with pytest.raises(FitError, match="checkpoint has Adam state, model uses SGD"):
        run(fixture("cnn_adam.keras"), 1, tmp_path / "x.keras", model=f"{__file__}:cnn_with_sgd")
    res = run(fixture("cnn_adam.keras"), 2, tmp_path / "y.keras",
              model=f"{__file__}:cnn_with_sgd", reset_optimizer=True)
    assert res.iteration_start == 0 and res.iteration_end == 2 and res.writer == "keras"
    assert load_keras_model(tmp_path / "y.keras").optimizer.__class__.__name__ == "SGD"


def test_missing_weight_and_allow_missing(tmp_path):
    from surgeon.train import FitError
    with pytest.raises(FitError) as exc:
        run(fixture("cnn_adam.keras"), 1, tmp_path / "x.keras", model=f"{__file__}:cnn_with_extra_layer")
    assert "extra/kernel" in exc.value.report.missing
    assert "optimizer/extra/kernel/momentum" in exc.value.report.missing
    res = run(fixture("cnn_adam.keras"), 1, tmp_path / "y.keras",
              model=f"{__file__}:cnn_with_extra_layer", allow_missing=True, seed=1)
    assert res.report["missing"] and res.writer == "keras"
    assert res.iteration_end == 4  # the rest of the optimizer state was restored


def test_bare_weights_bound_with_function_model(tmp_path):
    """A .weights.h5 with --model module:function: the function's model config binds every
    slot exactly (no guessing), so nothing is left over."""
    res = run(fixture("cnn_adam.weights.h5"), 2, tmp_path / "x.weights.h5",
              model=f"{__file__}:cnn_with_adam")
    assert res.report["ok"] and res.report["restored"] == 30 and res.writer == "surgeon"
    assert res.iteration_end == 5


def cnn_with_adam():
    import keras
    import make_fixtures
    m = make_fixtures.build_cnn()
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return m


# -- edits survive training ----------------------------------------------------------------

def test_masks_keep_pruned_weights_and_moments_zero(tmp_path):
    with open_checkpoint(fixture("cnn_adam.keras")) as ck:
        k = ck.read("conv2/kernel")
    keep = np.abs(k) > np.quantile(np.abs(k), 0.5)
    res = run(fixture("cnn_adam.keras"), 5, tmp_path / "m.keras", masks={"conv2/kernel": keep})
    assert res.masks == ["conv2/kernel"]
    t = tensors(tmp_path / "m.keras")
    for n in ("conv2/kernel", "optimizer/conv2/kernel/momentum", "optimizer/conv2/kernel/velocity"):
        assert np.all(t[n][~keep] == 0) and not np.any(np.signbit(t[n][~keep])), n
        assert np.all(t[n][keep] != 0), n  # the rest trained
    assert int(t["optimizer/iteration"]) == 8


def test_reset_slots_start_from_zero_and_iteration_continues(tmp_path):
    src = fixture("cnn_sgdm.keras")
    edited = tmp_path / "edited.keras"
    with open_checkpoint(src) as ck, open_writer(edited, like=ck) as w:
        w.write("optimizer/head/kernel/momentum", np.zeros((6, 3), "float32"))
        w.finalize()
    res = run(edited, 0, tmp_path / "same.keras")
    t = tensors(tmp_path / "same.keras")
    assert not np.any(t["optimizer/head/kernel/momentum"]) and res.iteration_end == 3
    # one SGD-momentum step from a zero momentum: m = -lr * g, w' = w + m
    run(edited, 1, tmp_path / "one.keras")
    t1, t0 = tensors(tmp_path / "one.keras"), tensors(edited)
    np.testing.assert_allclose(t1["head/kernel"] - t0["head/kernel"],
                               t1["optimizer/head/kernel/momentum"], rtol=1e-5, atol=1e-7)
    assert int(t1["optimizer/iteration"]) == 4


def test_interrupt_leaves_last_complete_checkpoint(tmp_path):
    out = tmp_path / "out.keras"

    def stop(i, n, loss):
        if i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(fixture("cnn_adam.keras"), 10, out, every=2, on_step=stop)
    assert load_keras_model(out).optimizer.iterations.numpy() == 5  # saved at step 2
    assert [p.name for p in tmp_path.iterdir()] == ["out.keras"]  # no temp files left


# -- CLI -----------------------------------------------------------------------------------

def test_cli_resume_json_and_text(tmp_path):
    out = tmp_path / "o.keras"
    r = run_cli("resume", fixture("nested_adagrad.keras"), "--data", f"{DATA}:nested_arrays",
                "--batch-size", 4, "--steps", 3, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    js = json.loads(r.output)
    assert (js["iteration_start"], js["iteration_end"], js["writer"]) == (3, 6, "surgeon")
    assert js["restore"]["ok"] and js["restore"]["restored"] == 20 and js["checkpoints"] == [str(out)]
    r = run_cli("resume", fixture("nested_adagrad.keras"), "--data", f"{DATA}:nested_data",
                "--steps", 2, "-o", tmp_path / "t.keras", "--every", 1)
    assert r.exit_code == 0
    assert "iteration 3 -> 5" in r.output and "written 2 time(s)" in r.output


def test_cli_bad_data_spec(tmp_path):
    r = run_cli("resume", fixture("cnn_adam.keras"), "--data", "nodata", "--steps", 1, "-o",
                tmp_path / "o.keras")
    assert r.exit_code == 2
    assert "surgeon: error: nodata: --data expects MODULE:FUNCTION" in r.output
    r = run_cli("resume", fixture("cnn_adam.keras"), "--data", f"{DATA}:nope", "--steps", 1,
                "-o", tmp_path / "o.keras")
    assert r.exit_code == 2 and "has no function 'nope'" in r.output


def test_cli_help_has_example():
    r = run_cli("resume", "--help")
    assert r.exit_code == 0 and "Example:" in r.output and "--reset-optimizer" in r.output


def test_split_resume_through_format_conversion(tmp_path):
    """k steps, ``surgeon convert`` to a legacy Keras .h5, resume N-k: same bits as N steps."""
    pytest.importorskip("surgeon.cli.convert")
    src = fixture("cnn_rmsprop.keras")
    run(src, 4, tmp_path / "ck_{iteration}.keras", every=2)  # ck_5, ck_7
    r = run_cli("convert", tmp_path / "ck_5.keras", tmp_path / "ck_5_legacy.h5")
    assert r.exit_code == 0, r.output
    rest = run(tmp_path / "ck_5_legacy.h5", 2, tmp_path / "rest.h5", model=src)
    assert (rest.iteration_start, rest.iteration_end, rest.writer) == (5, 7, "surgeon")
    a = tensors(tmp_path / "ck_7.keras")
    b = tensors(tmp_path / "rest.h5", model=src)
    assert_bit_identical({n: a[n] for n in b}, b)
    assert set(a) == set(b)


def test_cli_kill_leaves_last_checkpoint(tmp_path):
    """A real SIGINT to a running ``surgeon resume``: the --every checkpoint stays intact."""
    import signal
    import subprocess
    import sys
    import time
    slow = tmp_path / "slow_data.py"
    slow.write_text(
        "import time, sys\n"
        f"sys.path.insert(0, {os.path.dirname(DATA)!r})\n"
        "import example_data\n"
        "def data():\n"
        "    import tensorflow as tf\n"
        "    def wait(x, y):\n"
        "        time.sleep(0.2)\n"
        "        return x, y\n"
        "    def slow(x, y):\n"
        "        a, b = tf.numpy_function(wait, [x, y], [tf.float32, tf.int32])\n"
        "        a.set_shape(x.shape)\n"
        "        b.set_shape(y.shape)\n"
        "        return a, b\n"
        "    return example_data.cnn_data().map(slow)\n")
    out = tmp_path / "out.keras"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.Popen([sys.executable, "-m", "surgeon", "resume", str(fixture("cnn_adam.keras")),
                          "--data", f"{slow}:data", "--steps", "1000", "--every", "2", "-o", str(out)],
                         env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "surgeon: interrupted; last complete checkpoint: " in err
    it = int(load_keras_model(out).optimizer.iterations.numpy())
    assert it >= 5 and (it - 3) % 2 == 0
    assert [q.name for q in tmp_path.iterdir() if q.name != "slow_data.py"] == ["out.keras"]
