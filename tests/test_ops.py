"""Every op on real Keras fixtures: weights AND slots against numpy, for each slot policy."""
import numpy as np
import pytest

from conftest import fixture, load_keras_model
from recipe_helpers import keras_loads_and_trains, keras_slot, read_all, run
from surgeon.ops import initializers
from surgeon.ops.base import rng_for
from surgeon.ops.mask import read_masks
from surgeon.ops.transfer import adapt
from surgeon.recipe import (cast, clip, mask, noise, reinit, rescale, select, shrink_perturb,
                            transfer, transplant, zero)

ORIG = {}


def orig(name="cnn_adam.keras"):
    if name not in ORIG:
        ORIG[name] = read_all(fixture(name))
    return ORIG[name]


@pytest.fixture(scope="module")
def trained_targets(tmp_path_factory):
    """The fresh recipe targets trained 2 steps by Keras: their slots are non-zero, so
    ``keep``, ``reset`` and ``transplant`` give different results on them."""
    from recipe_helpers import batch_for
    d = tmp_path_factory.mktemp("trained_targets")
    out = {}
    for name in ("recipe/cnn5_fresh.keras", "recipe/encoder_fresh.keras"):
        model = load_keras_model(fixture(name))
        x, y = batch_for(model)
        model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
        out[name] = str(d / name.split("/")[-1].replace("fresh", "trained"))
        model.save(out[name])
    return out


def untouched_except(new, old, changed):
    for k in old:
        if k not in changed:
            np.testing.assert_array_equal(np.asarray(new[k]), np.asarray(old[k]), err_msg=k)


def slots(name):
    return [f"optimizer/{name}/momentum", f"optimizer/{name}/velocity"]


@pytest.mark.parametrize("policy", ["keep", "reset", "warm"])
def test_zero(tmp_path, policy):
    o = orig()
    plan, out = run(tmp_path, [zero("conv2/kernel", slots=policy)])
    n = read_all(out)
    assert not n["conv2/kernel"].any()
    m, v = slots("conv2/kernel")
    if policy == "keep":
        np.testing.assert_array_equal(n[m], o[m])
        np.testing.assert_array_equal(n[v], o[v])
    elif policy == "reset":
        assert not n[m].any() and not n[v].any()
    else:
        assert not n[m].any()
        np.testing.assert_allclose(n[v], np.full_like(o[v], o[v].mean()), rtol=1e-6)
    untouched_except(n, o, {"conv2/kernel", m, v})
    assert [s.target for s in plan.steps] == ["conv2/kernel"]


@pytest.mark.parametrize("policy", ["keep", "follow", "reset"])
def test_rescale(tmp_path, policy):
    o = orig()
    run(tmp_path, [rescale("conv1/*", factor=0.5, slots=policy)])
    n = read_all(tmp_path / "out.keras")
    for w in ("conv1/kernel", "conv1/bias"):
        np.testing.assert_allclose(n[w], o[w] * 0.5, rtol=1e-6)
        m, v = slots(w)
        if policy == "keep":
            np.testing.assert_array_equal(n[m], o[m])
        elif policy == "follow":
            np.testing.assert_allclose(n[m], o[m] * 0.5, rtol=1e-6)
            np.testing.assert_allclose(n[v], o[v] * 0.25, rtol=1e-6)
        else:
            assert not n[m].any() and not n[v].any()


def test_rescale_follow_rmsprop_and_sgd_slots(tmp_path):
    # first-moment slots scale by c, second-moment (squared-gradient) slots by c**2
    for fx, kinds in (("cnn_rmsprop.keras", {"velocity": 4.0, "momentum": 2.0, "average_gradient": 2.0}),
                      ("cnn_sgdm.keras", {"momentum": 2.0})):
        o = orig(fx)
        run(tmp_path, [rescale("conv2/kernel", factor=2.0, slots="follow")], input=fx, name=fx)
        n = read_all(tmp_path / fx)
        for kind, scale in kinds.items():
            name = f"optimizer/conv2/kernel/{kind}"
            np.testing.assert_allclose(n[name], o[name] * scale, rtol=1e-6, err_msg=name)


def test_clip_resets_only_clipped_elements(tmp_path):
    o = orig()
    run(tmp_path, [clip("conv1/kernel", min=-0.1, max=0.1, slots="reset")])
    n = read_all(tmp_path / "out.keras")
    w = o["conv1/kernel"]
    np.testing.assert_allclose(n["conv1/kernel"], np.clip(w, -0.1, 0.1))
    clipped = (w < -0.1) | (w > 0.1)
    assert clipped.any() and (~clipped).any()
    for s in slots("conv1/kernel"):
        np.testing.assert_array_equal(n[s], np.where(clipped, 0.0, o[s]))


def test_reinit_default_initializers_seeded(tmp_path):
    o = orig()
    plan, out = run(tmp_path, [reinit("head/*", seed=3)])
    n = read_all(out)
    details = {s.target: dict(s.detail) for s in plan.steps}
    head = load_keras_model(fixture("cnn_adam.keras")).get_layer("head")  # what Keras declares
    assert details["head/kernel"]["initializer"] == _snake(head.kernel_initializer) == "glorot_uniform"
    assert details["head/bias"]["initializer"] == _snake(head.bias_initializer) == "zeros"
    bound = np.abs(keras_draws("glorot_uniform", (6, 3))).max()
    assert 0 < np.abs(n["head/kernel"]).max() <= bound * 1.0001 and not n["head/bias"].any()
    assert not np.allclose(n["head/kernel"], o["head/kernel"])
    for s in slots("head/kernel") + slots("head/bias"):
        assert not n[s].any()
    untouched_except(n, o, {"head/kernel", "head/bias", *slots("head/kernel"), *slots("head/bias")})
    run(tmp_path, [reinit("head/*", seed=3)], name="again.keras")
    np.testing.assert_array_equal(read_all(tmp_path / "again.keras")["head/kernel"], n["head/kernel"])


def _snake(init):
    import re
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(init).__name__).lower()


def keras_draws(name, shape, n=50):
    """``n`` tensors drawn by Keras' own initializer ``name`` (seeds 0..n-1), stacked."""
    import keras
    init = keras.initializers.get(name)
    cfg = init.get_config()
    return np.stack([np.asarray(type(init).from_config(dict(cfg, seed=i))(shape, "float32"))
                     for i in range(n)])


KERAS_INIT = ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform",
              "lecun_normal", "random_normal", "random_uniform", "truncated_normal", "orthogonal"]


@pytest.mark.parametrize("shape", [(3, 3, 16, 40), (300, 20), (20, 300)])
def test_initializer_statistics_match_keras(shape):
    """surgeon's numpy sampler against Keras' initializers: spread, centre and bound per shape
    (fan_in != fan_out, so a fan mix-up shows)."""
    rng = np.random.default_rng(0)
    for name in KERAS_INIT:
        ours = initializers.sample(name, shape, rng)
        theirs = keras_draws(name, shape, n=2)
        assert abs(ours.std() / theirs.std() - 1) < 0.05, (name, ours.std(), theirs.std())
        assert abs(ours.mean()) < 0.05 * theirs.std() + 1e-12, (name, ours.mean())
        if name not in ("random_normal", "orthogonal"):  # bounded: uniform or truncated
            bound = np.abs(theirs).max()
            assert bound * 0.9 < np.abs(ours).max() <= bound * 1.02, name


def test_initializers_match_keras_semantics():
    from keras.src.initializers.random_initializers import compute_fans as keras_fans
    for shape in [(5,), (7, 3), (3, 3, 4, 8), (2, 3, 3, 4, 6)]:
        assert initializers.compute_fans(shape) == tuple(int(x) for x in keras_fans(shape))
    rng = np.random.default_rng(0)
    shape = (3, 3, 64, 128)
    fan_in, fan_out = 3 * 3 * 64, 3 * 3 * 128
    he = initializers.sample("he_normal", shape, rng)
    assert abs(he.std() / np.sqrt(2.0 / fan_in) - 1) < 0.02
    assert np.abs(he).max() <= 2 * np.sqrt(2.0 / fan_in) / 0.87962566103423978 + 1e-9
    gu = initializers.sample("glorot_uniform", shape, rng)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(gu).max() <= limit and np.abs(gu).max() > 0.99 * limit
    orth = initializers.sample("orthogonal", (16, 16), rng)
    np.testing.assert_allclose(orth @ orth.T, np.eye(16), atol=1e-10)
    assert (initializers.sample({"class_name": "Constant", "config": {"value": 2.5}}, (2,), rng) == 2.5).all()


def test_noise_seeded(tmp_path):
    o = orig()
    run(tmp_path, [noise("conv2/*", std=0.05, seed=7)])
    n = read_all(tmp_path / "out.keras")
    eps = ((n["conv2/kernel"] - o["conv2/kernel"]) / 0.05).astype(np.float64)  # ~ N(0, 1), 144 values
    assert abs(eps.std() - 1) < 0.3 and abs(eps.mean()) < 0.3
    for w in ("conv2/kernel", "conv2/bias"):
        eps = rng_for(7, w).normal(0.0, 1.0, o[w].shape)
        np.testing.assert_allclose(n[w], (o[w] + 0.05 * eps).astype("float32"), rtol=1e-6)
        for s in slots(w):
            np.testing.assert_array_equal(n[s], o[s])


@pytest.mark.parametrize("policy", ["reset", "follow", "keep"])
def test_shrink_perturb(tmp_path, policy):
    o = orig()
    plan, out = run(tmp_path, [shrink_perturb(select("*", role="param"), shrink=0.4, perturb=0.1,
                                              seed=1, slots=policy)])
    n = read_all(out)
    assert {s.target for s in plan.steps} == {k for k in o if k.split("/")[0] in
                                               ("conv1", "bn", "conv2", "frozen", "head")
                                               and "moving" not in k}
    for w in ("conv1/kernel", "conv2/kernel"):  # eps drawn like Keras' glorot_uniform for w
        eps = (n[w].astype(np.float64) - 0.4 * o[w]) / 0.1
        theirs = keras_draws("glorot_uniform", o[w].shape)
        assert np.abs(eps).max() <= np.abs(theirs).max() * 1.001 + 1e-6, w
        assert abs(eps.std() / theirs.std() - 1) < 0.25, (w, eps.std(), theirs.std())
    w = "conv1/kernel"
    np.testing.assert_array_equal(n["bn/moving_mean"], o["bn/moving_mean"])
    m, v = slots(w)
    expect = {"reset": (0 * o[m], 0 * o[v]), "keep": (o[m], o[v]),
              "follow": (0.4 * o[m], 0.16 * o[v])}[policy]
    np.testing.assert_allclose(n[m], expect[0], rtol=1e-6)
    np.testing.assert_allclose(n[v], expect[1], rtol=1e-6)


@pytest.mark.parametrize("policy", ["keep", "follow"])
def test_cast_bfloat16(tmp_path, policy):
    import ml_dtypes
    o = orig()
    run(tmp_path, [cast("conv1/*", dtype="bfloat16", slots=policy)])
    n = read_all(tmp_path / "out.keras")
    assert n["conv1/kernel"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(n["conv1/kernel"], o["conv1/kernel"].astype(ml_dtypes.bfloat16))
    m, _ = slots("conv1/kernel")
    assert n[m].dtype == (ml_dtypes.bfloat16 if policy == "follow" else np.float32)
    if policy == "follow":
        keras_loads_and_trains(tmp_path / "out.keras")
    run(tmp_path, [cast("conv1/*", dtype="float32", slots=policy)], input=str(tmp_path / "out.keras"),
        name="back.keras")
    back = read_all(tmp_path / "back.keras")
    assert back["conv1/kernel"].dtype == np.float32
    np.testing.assert_array_equal(back["conv1/kernel"], n["conv1/kernel"].astype(np.float32))


def test_cast_keras_sees_rounded_values(tmp_path):
    import ml_dtypes
    from conftest import load_keras_model
    run(tmp_path, [cast("*", dtype="bfloat16")])
    model = load_keras_model(tmp_path / "out.keras")
    k = model.get_layer("conv2").kernel.numpy()
    np.testing.assert_array_equal(k, orig()["conv2/kernel"].astype(ml_dtypes.bfloat16).astype("float32"))


@pytest.mark.parametrize("policy", ["reset", "keep", "warm"])
def test_mask_magnitude_and_persisted(tmp_path, policy):
    o = orig()
    run(tmp_path, [mask("conv2/kernel", sparsity=0.5, slots=policy)])
    out = tmp_path / "out.keras"
    n = read_all(out)
    w = o["conv2/kernel"]
    thresh = np.sort(np.abs(w).ravel())[w.size // 2 - 1]
    keep = np.abs(w) > thresh
    np.testing.assert_array_equal(n["conv2/kernel"], np.where(keep, w, 0))
    masks = read_masks(out)
    assert list(masks) == ["conv2/kernel"]
    np.testing.assert_array_equal(masks["conv2/kernel"], keep)
    assert masks["conv2/kernel"].mean() == 0.5
    m, v = slots("conv2/kernel")
    if policy == "reset":
        np.testing.assert_array_equal(n[m], np.where(keep, o[m], 0))
        np.testing.assert_array_equal(n[v], np.where(keep, o[v], 0))
    elif policy == "keep":
        np.testing.assert_array_equal(n[v], o[v])
    else:
        np.testing.assert_array_equal(n[m], np.where(keep, o[m], 0))
        np.testing.assert_allclose(n[v], np.where(keep, o[v], o[v].mean()), rtol=1e-6)
    if policy == "reset":
        keras_loads_and_trains(out)
        # pruning again never revives a weight: masks combine
        run(tmp_path, [mask("conv2/kernel", sparsity=0.25)], input=str(out), name="again.keras")
        again = read_masks(tmp_path / "again.keras")["conv2/kernel"]
        assert again.mean() == 0.5 and (again <= keep).all()


def test_mask_on_weights_h5(tmp_path):
    plan, out = run(tmp_path, [mask("*/kernel", sparsity=0.5)], input="cnn_adam.weights.h5",
                    name="out.weights.h5", model=str(fixture("cnn_adam.keras")))
    masks = read_masks(out)
    assert sorted(masks) == ["conv1/kernel", "conv2/kernel", "frozen/kernel", "head/kernel"]
    load_keras_model(out, weights_of=fixture("cnn_adam.keras"))


@pytest.mark.parametrize("policy", ["reset", "transplant", "keep"])
def test_transfer_by_name_with_reinit_head(tmp_path, policy, trained_targets):
    target = trained_targets["recipe/cnn5_fresh.keras"]
    src, tgt = orig(), orig(target)
    plan, out = run(tmp_path, [transfer(str(fixture("cnn_adam.keras")), on_mismatch="reinit",
                                        slots=policy)], input=target)
    n = read_all(out)
    for w in ("conv1/kernel", "bn/gamma", "bn/moving_variance", "conv2/bias", "frozen/kernel"):
        np.testing.assert_array_equal(n[w], src[w])
    assert n["head/kernel"].shape == (6, 5) and not n["head/bias"].any()
    m, v = slots("conv1/kernel")
    assert tgt[m].any() and tgt[v].any() and not np.array_equal(tgt[m], src[m])
    want = {"transplant": src, "keep": tgt, "reset": {m: 0 * tgt[m], v: 0 * tgt[v]}}[policy]
    np.testing.assert_array_equal(n[m], want[m])
    np.testing.assert_array_equal(n[v], want[v])
    head_m = "optimizer/head/kernel/momentum"
    if policy != "keep":  # reinit: the target's slots restart
        assert tgt[head_m].any() and not n[head_m].any()
    (report,) = plan.reports
    assert {m["target"] for m in report["mismatched"]} == {"head/kernel", "head/bias"}
    assert len(report["matched"]) == 10 and not report["unmatched_targets"]
    if policy == "transplant":
        load_keras_model(out)


def test_transfer_slice_pad_transplant_slots(tmp_path):
    big, small = orig("recipe/cnn5_fresh.keras"), orig()
    run(tmp_path, [transfer(str(fixture("recipe/cnn5_fresh.keras")), "head/*", on_mismatch="slice",
                            slots="transplant")], name="slice.keras")
    n = read_all(tmp_path / "slice.keras")
    np.testing.assert_array_equal(n["head/kernel"], big["head/kernel"][:, :3])
    np.testing.assert_array_equal(n["head/bias"], big["head/bias"][:3])
    run(tmp_path, [transfer(str(fixture("cnn_adam.keras")), "head/*", on_mismatch="pad",
                            slots="transplant")], input="recipe/cnn5_fresh.keras", name="pad.keras")
    p = read_all(tmp_path / "pad.keras")
    np.testing.assert_array_equal(p["head/kernel"][:, :3], small["head/kernel"])
    np.testing.assert_array_equal(p["head/kernel"][:, 3:], big["head/kernel"][:, 3:])
    m = "optimizer/head/kernel/momentum"
    np.testing.assert_array_equal(p[m][:, :3], small[m])
    assert not p[m][:, 3:].any()
    keras_loads_and_trains(tmp_path / "pad.keras")


def test_transfer_auto_order_and_shape(tmp_path):
    src = orig("nested_adamw.keras")
    plan, out = run(tmp_path, [transfer(str(fixture("nested_adamw.keras")), on_mismatch="skip",
                                        slots="transplant")], input="recipe/encoder_fresh.keras")
    (r,) = plan.reports
    by = {m["target"]: (m["source"], m["by"]) for m in r["matched"]}
    assert by["encoder/fc1/kernel"] == ("backbone/fc1/kernel", "order+shape")
    assert by["bn/gamma"] == ("bn/gamma", "name")
    assert {m["target"] for m in r["mismatched"]} == {"head/kernel", "head/bias"}
    n = read_all(out)
    np.testing.assert_array_equal(n["encoder/fc2/kernel"], src["backbone/fc2/kernel"])
    np.testing.assert_array_equal(n["optimizer/encoder/fc2/kernel/velocity"],
                                  src["optimizer/backbone/fc2/kernel/velocity"])


def test_transfer_map_regex(tmp_path):
    src = orig("nested_adamw.keras")
    plan, out = run(tmp_path, [transfer(str(fixture("nested_adamw.keras")), map={r"backbone/(.*)": r"encoder/\1"})],
                    input="recipe/encoder_fresh.keras")
    assert {s.target for s in plan.steps} == {f"encoder/fc{i}/{w}" for i in (1, 2) for w in ("kernel", "bias")}
    np.testing.assert_array_equal(read_all(out)["encoder/fc1/bias"], src["backbone/fc1/bias"])


def test_adapt_input_channels_sum_end_to_end(tmp_path):
    src = orig()
    plan, out = run(tmp_path, [transfer(str(fixture("cnn_adam.keras")), adapt_input_channels="auto")],
                    input="recipe/cnn_gray_fresh.keras")
    n = read_all(out)
    np.testing.assert_allclose(n["conv1/kernel"], src["conv1/kernel"].sum(axis=2, keepdims=True), rtol=1e-6)
    load_keras_model(out)


def test_adapt_repeat_like_timm():
    w = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
    out = adapt(w, np.zeros((2, 2, 5, 4), np.float32), "adapt-repeat")
    expect = np.concatenate([w, w], axis=2)[:, :, :5, :] * (3 / 5)
    np.testing.assert_allclose(out, expect)
    summed = adapt(w, np.zeros((2, 2, 1, 4), np.float32), "adapt-sum")
    np.testing.assert_allclose(summed, w.sum(axis=2, keepdims=True))


def test_transplant_slots_and_iteration(tmp_path):
    src = orig("nested_adamw.keras")
    plan, out = run(tmp_path, [transplant(str(fixture("nested_adamw.keras")), layers=["backbone/*=encoder/*"])],
                    input="recipe/encoder_fresh.keras", iteration=3)
    n = read_all(out)
    for w in ("fc1/kernel", "fc2/bias"):
        np.testing.assert_array_equal(n[f"encoder/{w}"], src[f"backbone/{w}"])
        for s in ("momentum", "velocity"):
            np.testing.assert_array_equal(n[f"optimizer/encoder/{w}/{s}"], src[f"optimizer/backbone/{w}/{s}"])
    assert int(n["optimizer/iteration"]) == 3
    model = keras_loads_and_trains(out)
    # Keras itself sees the transplanted slots under the target's names (before the extra step)
    from conftest import load_keras_model
    fresh = load_keras_model(out)
    np.testing.assert_array_equal(keras_slot(fresh, "encoder/fc1/kernel", "momentum"),
                                  src["optimizer/backbone/fc1/kernel/momentum"])
    del model


def test_transplant_between_optimizers_resets_missing_slot_kinds(tmp_path, trained_targets):
    """Adagrad has no momentum/velocity: the (trained, non-zero) target slots become zero."""
    target = trained_targets["recipe/encoder_fresh.keras"]
    plan, out = run(tmp_path, [transplant(str(fixture("nested_adagrad.keras")), layers=["backbone/*=encoder/*"])],
                    input=target)
    n, before = read_all(out), orig(target)
    for w in ("fc1/kernel", "fc2/bias"):
        for s in ("momentum", "velocity"):
            name = f"optimizer/encoder/{w}/{s}"
            assert before[name].any() and not n[name].any(), name
    np.testing.assert_array_equal(n["encoder/fc1/kernel"], orig("nested_adagrad.keras")["backbone/fc1/kernel"])
