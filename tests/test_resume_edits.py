"""Edits that survive training and edits made during training (custom loop and model.fit)."""
import os

import numpy as np
import pytest

from conftest import fixture, load_keras_model, run_cli
from surgeon import open_checkpoint
from surgeon.train.edits import Clip, Mask, Noise, Rescale, ShrinkPerturb, Zero

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "recipes", "example_data.py")


@pytest.fixture(scope="module", autouse=True)
def deterministic():
    import tensorflow as tf
    tf.config.experimental.enable_op_determinism()


def tensors(path):
    with open_checkpoint(path) as ck:
        return {e.name: ck.read(e.name) for e in ck.entries()}


def run(ckpt, steps, out, **kw):
    from surgeon.train import resume
    return resume(str(ckpt), data=f"{DATA}:cnn_data", steps=steps, output=str(out), **kw)


def example_data():
    import importlib.util
    spec = importlib.util.spec_from_file_location("example_data_mod2", DATA)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_mask_survives_resume(tmp_path):
    """A mask written by the recipe engine's ``mask`` op is honoured by resume."""
    pytest.importorskip("surgeon.cli.recipe")
    pruned = tmp_path / "pruned.keras"
    recipe = tmp_path / "prune.py"
    recipe.write_text(
        "from surgeon.recipe import recipe, mask\n"
        f"RECIPE = recipe(input={str(fixture('cnn_adam.keras'))!r}, output={str(pruned)!r},\n"
        "                ops=[mask('conv2/kernel', sparsity=0.5)])\n")
    r = run_cli("apply", recipe)
    assert r.exit_code == 0, r.output
    from surgeon.ops.mask import read_masks
    keep = read_masks(pruned)["conv2/kernel"]
    assert keep.mean() == 0.5
    res = run(pruned, 5, tmp_path / "out.keras")
    assert res.masks == ["conv2/kernel"] and res.iteration_end == 8
    t = tensors(tmp_path / "out.keras")
    for n in ("conv2/kernel", "optimizer/conv2/kernel/momentum", "optimizer/conv2/kernel/velocity"):
        assert np.all(t[n][~keep] == 0) and not np.any(np.signbit(t[n][~keep])), n
        assert np.all(t[n][keep] != 0), n
    assert read_masks(tmp_path / "out.keras")["conv2/kernel"].tobytes() == keep.tobytes()
    load_keras_model(tmp_path / "out.keras")  # Keras loads it without warnings


def test_in_loop_zero_and_clip(tmp_path):
    """Zero (slots reset) on one tensor, clip (slots kept) on the others, every step."""
    run(fixture("cnn_adam.keras"), 3, tmp_path / "z.keras",
        edits=[Zero(select="head/kernel"), Clip(min=-0.05, max=0.05, select="conv*")])
    t = tensors(tmp_path / "z.keras")
    assert not np.any(t["head/kernel"])
    assert not np.any(t["optimizer/head/kernel/momentum"])
    assert not np.any(t["optimizer/head/kernel/velocity"])
    assert np.any(t["head/bias"]) and np.any(t["optimizer/head/bias/momentum"])
    for n in ("conv1/kernel", "conv1/bias", "conv2/kernel", "conv2/bias"):
        assert t[n].min() >= -0.05 and t[n].max() <= 0.05, n
    assert np.isclose(np.abs(t["conv2/kernel"]), 0.05).any()  # clipping happened
    assert np.any(t["optimizer/conv2/kernel/momentum"])  # keep: slots untouched


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """The reference: one plain step from cnn_adam."""
    out = tmp_path_factory.mktemp("one") / "a.keras"
    run(fixture("cnn_adam.keras"), 1, out)
    return tensors(out)


def test_follow_policy_scales_slots_by_power(tmp_path, one_step):
    res = run(fixture("cnn_adam.keras"), 1, tmp_path / "b.keras",
              edits=[Rescale(2.0, select="head/kernel", slots="follow")])
    a, b = one_step, tensors(tmp_path / "b.keras")
    np.testing.assert_array_equal(b["head/kernel"], a["head/kernel"] * 2)
    np.testing.assert_array_equal(b["optimizer/head/kernel/momentum"],
                                  a["optimizer/head/kernel/momentum"] * 2)
    np.testing.assert_array_equal(b["optimizer/head/kernel/velocity"],
                                  a["optimizer/head/kernel/velocity"] * 4)
    np.testing.assert_array_equal(b["head/bias"], a["head/bias"])
    assert res.iteration_end == 4


def test_in_loop_mask_sparsity_matches_offline_op(tmp_path, one_step):
    from surgeon.ops.mask import magnitude_mask
    run(fixture("cnn_adam.keras"), 1, tmp_path / "m.keras",
        edits=[Mask(sparsity=0.25, select="conv1/kernel")])
    a, m = one_step, tensors(tmp_path / "m.keras")
    keep = magnitude_mask(a["conv1/kernel"], 0.25)
    np.testing.assert_array_equal(m["conv1/kernel"], np.where(keep, a["conv1/kernel"], 0))
    assert not np.any(m["optimizer/conv1/kernel/velocity"][~keep])


OPS = [Clip(min=-0.2, max=0.2, select="conv*"), Noise(std=0.01, seed=3, select="head/*"),
       ShrinkPerturb(shrink=0.9, perturb=0.001, select="conv2/kernel", slots="follow")]


def test_recipe_callback_in_fit_equals_custom_loop_hook(tmp_path):
    """The same ops every 2 steps: model.fit + RecipeCallback == resume(edits=...), bitwise."""
    from surgeon.keras import RecipeCallback
    run(fixture("cnn_adam.keras"), 4, tmp_path / "loop.keras", edits=OPS, edit_every=2)
    model = load_keras_model(fixture("cnn_adam.keras"))
    ds = example_data().cnn_data().repeat().skip(3).take(4)
    cb = RecipeCallback(OPS, every_n_steps=2)
    model.fit(ds, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
    ours = tensors(tmp_path / "loop.keras")
    with open_checkpoint(fixture("cnn_adam.keras")) as ck:
        entries = ck.entries()
    weights = [e.name for e in entries if e.role in ("param", "state")]
    assert [ours[n].tobytes() for n in weights] == [v.numpy().tobytes() for v in model.weights]
    opt = [e.name for e in entries if e.role in ("slot", "optimizer")]
    assert [ours[n].tobytes() for n in opt] == [v.numpy().tobytes() for v in model.optimizer.variables]
    assert np.abs(ours["conv1/kernel"]).max() < 0.25  # clipped at iteration 6, one step since
    assert "train_step" not in vars(model)  # the callback unwrapped the step at the end


def test_recipe_callback_accepts_recipe_ops(tmp_path):
    from surgeon.keras import RecipeCallback
    from surgeon.recipe import clip, zero
    model = load_keras_model(fixture("cnn_adam.keras"))
    ds = example_data().cnn_data().take(2)
    model.fit(ds, verbose=0, shuffle=False,
              callbacks=[RecipeCallback([zero("head/bias"), clip("conv*", min=-0.1, max=0.1)])])
    assert not np.any(model.get_layer("head").bias.numpy())
    assert np.abs(model.get_layer("conv1").kernel.numpy()).max() <= 0.1
    with pytest.raises(Exception, match="cannot run inside training"):
        from surgeon.recipe import reinit
        RecipeCallback([reinit("head/*")])


def test_constraint_route_for_clipping(tmp_path):
    """kernel_constraint: Keras' optimizer projects after every update, inside the step."""
    import keras
    from surgeon.keras import ClipConstraint
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    out = keras.layers.Dense(2, kernel_constraint=ClipConstraint(-0.05, 0.05), name="d")(inp)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.SGD(0.5), "mse")
    x = np.random.RandomState(0).standard_normal((16, 6)).astype("float32")
    model.fit(x, x[:, :2] * 10, batch_size=4, epochs=1, verbose=0)
    k = model.get_layer("d").kernel.numpy()
    assert np.abs(k).max() <= 0.05 and np.isclose(np.abs(k).max(), 0.05)
    model.save(tmp_path / "c.keras")
    again = load_keras_model(tmp_path / "c.keras")
    assert again.get_layer("d").kernel.constraint.get_config() == {"min_value": -0.05, "max_value": 0.05}


def test_seed_style_get_weights_inside_tf_function_fails():
    """Why surgeon assigns in-graph: get_weights() needs numpy, which a traced step lacks."""
    import keras
    import tensorflow as tf
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])

    @tf.function
    def prune():
        w = m.get_layer("d").get_weights()
        w[0][np.abs(w[0]) < 0.1] = 0
        m.get_layer("d").set_weights(w)

    with pytest.raises(NotImplementedError, match="numpy\\(\\) is only available when eager"):
        prune()
