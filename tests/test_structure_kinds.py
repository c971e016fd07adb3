"""Structural surgery on real architectures (issue 17): channel maps followed through
DepthwiseConv, SeparableConv, Conv*Transpose, the normalizations, PReLU, Embedding and
recurrent layers (LSTM/GRU/SimpleRNN, Bidirectional), and a MobileNetV2. Every model is
trained a few steps with a real optimizer and saved by Keras; every edit is written by
surgeon, loaded by Keras without warnings, compared with the source (function preserved by
widen, untouched tensors bit-identical, moved slots as the weights) and trained on."""
import os

import numpy as np
import pytest

from conftest import FIXTURES, load_keras_model, run_cli
from surgeon import open_checkpoint, structure as S


def _conv_model(keras):
    L = keras.layers
    x = keras.Input((8, 8, 3), name="image")
    h = L.Conv2D(6, 1, name="stem")(x)
    h = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU(6.0, name="relu")(h)
    h = L.ZeroPadding2D(1, name="pad")(h)
    h = L.SeparableConv2D(5, 3, name="sep")(h)
    h = L.PReLU(shared_axes=[1, 2], name="prelu")(h)
    h = L.Dropout(0.1, name="drop")(h)
    h = L.Conv2DTranspose(4, 3, name="tr")(h)
    h = L.GroupNormalization(groups=-1, name="gn")(h)
    h = L.DepthwiseConv2D(1, name="dw1")(h)
    h = L.Flatten(name="flat")(h)  # not pooling: the mean of an instance-normalised map is beta
    return keras.Model(x, L.Dense(3, name="out")(h), name="chan"), "adam", (8, 8, 3)


def _norm_model(keras):
    L = keras.layers
    x = keras.Input((6, 6, 3), name="image")
    h = L.Conv2D(8, 3, padding="same", name="stem")(x)
    h = L.GroupNormalization(groups=4, name="gn")(h)
    h = L.LayerNormalization(name="ln")(h)
    h = L.RMSNormalization(name="rms")(h)
    h = L.UnitNormalization(name="un")(h)
    h = L.SeparableConv2D(4, 3, depth_multiplier=2, name="sep")(h)
    h = L.Conv2DTranspose(3, 3, name="tr")(h)
    h = L.Flatten(name="flat")(h)
    opt = keras.optimizers.RMSprop(momentum=0.9)
    return keras.Model(x, L.Dense(2, name="out")(h), name="norms"), opt, (6, 6, 3)


def _seq_model(keras):
    L = keras.layers
    x = keras.Input((5,), dtype="int32", name="tokens")
    h = L.Embedding(10, 4, name="emb")(x)
    h = L.LSTM(3, return_sequences=True, name="lstm")(h)
    h = L.Bidirectional(L.GRU(2, return_sequences=True, name="gru"), name="bi")(h)  # named: auto names depend on the process
    h = L.SimpleRNN(3, name="srnn")(h)
    return keras.Model(x, L.Dense(2, name="out")(h), name="seq"), "adam", None


def _mha_model(keras):
    L = keras.layers
    x = keras.Input((5, 6), name="seq")
    h = L.Dense(6, name="proj")(x)
    h = L.MultiHeadAttention(3, 4, name="mha")(h, h)
    h = L.GlobalAveragePooling1D(name="gap")(h)
    return keras.Model(x, L.Dense(2, name="out")(h), name="attn"), "adam", (5, 6)


def _nest_model(keras):
    L = keras.layers
    x = keras.Input((3,), name="x")
    h = L.Dense(4, name="pre")(x)
    inner = keras.Sequential([keras.Input((4,)), L.Dense(5, name="a"), L.ReLU(name="r")],
                             name="inner")
    opt = keras.optimizers.SGD(momentum=0.9)
    return keras.Model(x, L.Dense(2, name="out")(inner(h)), name="nest"), opt, (3,)


def _mobilenet(keras):
    m = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                       classes=3, classifier_activation=None)  # logits
    return m, "adam", (32, 32, 3)


def _refuse_model(keras):
    L = keras.layers
    x = keras.Input((4, 4, 2), name="image")
    a = L.Conv2D(4, 1, name="a")(x)
    h = L.LayerNormalization(name="ln")(a)
    h = L.PReLU(shared_axes=[1, 2, 3], name="prelu")(h)  # one alpha: followed, nothing edited
    h = L.Conv2D(4, 1, groups=2, name="grouped")(h)
    b = L.Conv2D(4, 1, name="b")(x)
    h2 = L.Softmax(name="sm")(b)
    c = L.Conv2D(4, 1, name="c")(x)
    h3 = L.Activation("softmax", name="act")(c)
    h = L.Concatenate(name="cat")([h, h2, h3])
    h = L.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(x, L.Dense(2, name="out")(h), name="refuse"), "sgd", (4, 4, 2)


BUILDERS = {"refuse": _refuse_model, "nest": _nest_model, "mha": _mha_model, "chan": _conv_model, "norms": _norm_model, "seq": _seq_model, "mnv2": _mobilenet}


def _inputs(name, shape, n=4):
    rng = np.random.default_rng(7)
    if shape is None:
        return rng.integers(0, 10, size=(n, 5)).astype("int32")
    return rng.normal(size=(n,) + shape).astype("float32")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Each model built, trained 2 steps (MobileNetV2: 1) with its optimizer and saved once
    per session: (path, input shape, inputs, targets, the trained model's outputs)."""
    import keras
    root = tmp_path_factory.mktemp("kinds")
    cache = {}

    def get(name):
        if name not in cache:
            keras.utils.set_random_seed(0)
            model, opt, shape = BUILDERS[name](keras)
            model.compile(opt, "mse", run_eagerly=True)  # tiny steps: no tracing cost
            x = _inputs(name, shape)
            y = np.random.default_rng(3).normal(size=(4,) + model.output_shape[1:]).astype("float32")
            model.fit(x, y, batch_size=4 if name == "mnv2" else 2, epochs=1, verbose=0)
            path = root / f"{name}.keras"
            model.save(path)
            cache[name] = (path, shape, x, y, np.asarray(model(x, training=False)), model)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def chain(trained, tmp_path_factory):
    """Run edits one after another on a model (each on the previous output), once per
    session: [(plan, output path)] per step."""
    root = tmp_path_factory.mktemp("kinds_out")
    cache = {}

    def get(name, *steps):
        """Each prefix of ``steps`` is run once: a test of the first step alone shares it."""
        done, path = [], trained(name)[0]
        for i, (planner, kw) in enumerate(steps):
            key = (name,) + tuple((p.__name__, repr(sorted(k.items()))) for p, k in steps[:i + 1])
            if key not in cache:
                plan = planner(path, **kw)
                out = root / f"{name}_{len(cache)}.keras"
                S.execute(plan, out)
                cache[key] = (plan, out)
            done.append(cache[key])
            path = cache[key][1]
        return done
    return get


def tensors(path):
    with open_checkpoint(path) as ck:
        return {e.name: ck.read(e.name) for e in ck.entries()}


def outputs(path, x):
    return np.asarray(load_keras_model(path)(x, training=False))


def assert_untouched_identical(plan, old, new):
    """Every tensor the plan does not touch (weights and their slots) is bit-identical."""
    touched = set(plan.actions)
    for k, v in new.items():
        base = k[len("optimizer/"):].rsplit("/", 1)[0] if k.startswith("optimizer/") else k
        if k in touched or base in touched:
            continue
        assert k in old and np.array_equal(old[k], v), k


def trains_on(path, x, y, ref=None):
    """Keras loads ``path`` without warnings, its outputs equal ``ref`` (if given) to 1e-5,
    and training continues from the restored optimizer state."""
    model = load_keras_model(path)
    if ref is not None:
        got = np.asarray(model(x, training=False))
        assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), np.abs(got - ref).max()
    it0 = int(model.optimizer.iterations.numpy())
    assert it0 > 0
    hist = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == it0 + 1
    assert np.isfinite(hist.history["loss"][0])


W = S.plan_widen
CHAN_WIDEN = ((W, dict(layer="stem", to=9)),  # DepthwiseConv (multiplier 2), BN, ReLU6, pad -> Separable
              (W, dict(layer="sep", to=7)),   # SeparableConv producer, PReLU, Dropout -> Conv2DTranspose
              (W, dict(layer="tr", to=6)))    # Conv2DTranspose producer, GroupNorm(-1), Depthwise(1)
SEQ_WIDEN = ((W, dict(layer="emb", to=6)),    # Embedding producer -> LSTM input rows
             (W, dict(layer="lstm", to=5)),   # LSTM units (4 gate blocks) -> Bidirectional GRU
             (W, dict(layer="bi", to=4)),     # Bidirectional GRU (concat) -> SimpleRNN
             (W, dict(layer="srnn", to=5)))   # SimpleRNN -> Dense


@pytest.mark.parametrize("name,steps", [("chan", CHAN_WIDEN), ("seq", SEQ_WIDEN)], ids=["chan", "seq"])
def test_widen_chain_preserves_function_and_trains_on(trained, chain, name, steps):
    path, _, x, y, ref, _ = trained(name)
    done = chain(name, *steps)
    prev = tensors(path)
    for plan, out in done:
        cur = tensors(out)
        assert_untouched_identical(plan, prev, cur)
        prev = cur
    trains_on(done[-1][1], x, y, ref)


def test_depthwise_and_separable_follow_the_map_slots_alike(trained, chain):
    path = trained("chan")[0]
    plan, out = chain("chan", CHAN_WIDEN[0])[0]
    old, new = tensors(path), tensors(out)
    idx = plan.actions["stem/kernel"].steps[0]["index"]
    c = np.bincount(idx, minlength=6)[idx].astype(float)
    exp = [i * 2 + j for i in idx for j in range(2)]  # depth multiplier 2
    ce = np.repeat(c, 2)
    np.testing.assert_array_equal(new["dw/kernel"], old["dw/kernel"][:, :, idx, :])
    np.testing.assert_array_equal(new["dw/bias"], old["dw/bias"][exp])
    np.testing.assert_array_equal(new["bn/moving_mean"], old["bn/moving_mean"][exp])
    for v, cf, sl in (("dw/kernel", c[:, None], (slice(None), slice(None), idx)),
                      ("dw/bias", ce, (exp,)), ("bn/gamma", ce, (exp,))):
        for slot, p in (("momentum", 1), ("velocity", 2)):
            np.testing.assert_allclose(new[f"optimizer/{v}/{slot}"],
                                       old[f"optimizer/{v}/{slot}"][sl] / cf ** p, rtol=1e-6)
    # separable consumer: depthwise half per channel (slots / c), pointwise rows / c (slots kept)
    np.testing.assert_allclose(new["sep/pointwise_kernel"],
                               old["sep/pointwise_kernel"][:, :, exp, :] / ce[:, None], rtol=1e-6)
    np.testing.assert_array_equal(new["optimizer/sep/pointwise_kernel/velocity"],
                                  old["optimizer/sep/pointwise_kernel/velocity"][:, :, exp, :])
    np.testing.assert_allclose(new["optimizer/sep/depthwise_kernel/momentum"],
                               old["optimizer/sep/depthwise_kernel/momentum"][:, :, exp, :]
                               / ce[:, None], rtol=1e-6)


D, P = S.plan_delete_channels, S.plan_prune_channels
SEQ_DEL = ((D, dict(layer="lstm", channels=[1])), (P, dict(layer="bi", fraction=0.5)))
NORM_DEL = ((D, dict(layer="stem", channels=[0, 3, 5, 6])), (D, dict(layer="sep", channels=[2])))


def test_recurrent_gate_blocks_edited_together(trained, chain):
    path = trained("seq")[0]
    plan, out = chain("seq", SEQ_DEL[0])[0]
    old, new = tensors(path), tensors(out)
    keep, u = [0, 2], 3
    gates = [g * u + k for g in range(4) for k in keep]
    p = "lstm/lstm_cell"
    np.testing.assert_array_equal(new[f"{p}/kernel"], old[f"{p}/kernel"][:, gates])
    np.testing.assert_array_equal(new[f"{p}/recurrent_kernel"],
                                  old[f"{p}/recurrent_kernel"][keep][:, gates])
    np.testing.assert_array_equal(new[f"optimizer/{p}/bias/velocity"],
                                  old[f"optimizer/{p}/bias/velocity"][gates])
    for d in ("forward_gru", "backward_gru"):  # both directions' input rows
        k = f"bi/{d}/gru_cell/kernel"
        np.testing.assert_array_equal(new[k], old[k][keep])
        np.testing.assert_array_equal(new[f"optimizer/{k}/momentum"], old[f"optimizer/{k}/momentum"][keep])
    assert_untouched_identical(plan, old, new)


def test_prune_bidirectional_maps_both_halves_and_trains_on(trained, chain):
    _, _, x, y, _, _ = trained("seq")
    (_, before), (plan, out) = chain("seq", *SEQ_DEL)
    old, new = tensors(before), tensors(out)
    drop = plan.params["channels"]
    assert len(drop) == 1
    keep = [k for k in range(2) if k not in drop]
    np.testing.assert_array_equal(new["srnn/simple_rnn_cell/kernel"],
                                  old["srnn/simple_rnn_cell/kernel"][keep + [2 + k for k in keep]])
    gb = "bi/backward_gru/gru_cell/bias"  # GRU reset_after: bias (2, 3u)
    np.testing.assert_array_equal(new[gb], old[gb][:, [g * 2 + k for g in range(3) for k in keep]])
    assert_untouched_identical(plan, old, new)
    trains_on(out, x, y)


def test_delete_channels_through_normalizations(trained, chain):
    path = trained("norms")[0]
    plan, out = chain("norms", NORM_DEL[0])[0]
    old, new = tensors(path), tensors(out)
    keep = [1, 2, 4, 7]
    exp = [i * 2 + j for i in keep for j in range(2)]
    for v in ("gn/gamma", "ln/beta", "rms/scale", "optimizer/ln/gamma/velocity",
              "optimizer/gn/beta/momentum"):
        np.testing.assert_array_equal(new[v], old[v][keep])
    np.testing.assert_array_equal(new["sep/depthwise_kernel"], old["sep/depthwise_kernel"][:, :, keep])
    np.testing.assert_array_equal(new["sep/pointwise_kernel"], old["sep/pointwise_kernel"][:, :, exp])
    assert_untouched_identical(plan, old, new)


def test_transpose_producer_and_consumer_slices_and_trains_on(trained, chain):
    path, _, x, y, _, _ = trained("norms")
    (_, before), (plan, out) = chain("norms", *NORM_DEL)
    old, new = tensors(before), tensors(out)
    keep = [0, 1, 3]
    np.testing.assert_array_equal(new["sep/pointwise_kernel"], old["sep/pointwise_kernel"][..., keep])
    np.testing.assert_array_equal(new["tr/kernel"], old["tr/kernel"][..., keep])  # input: last axis
    np.testing.assert_array_equal(new["optimizer/tr/kernel/velocity"],
                                  old["optimizer/tr/kernel/velocity"][..., keep])
    assert_untouched_identical(plan, old, new)
    plan2 = S.plan_delete_channels(path, "tr", [0])  # transpose as producer: output axis -2
    assert plan2.actions["tr/kernel"].steps[0] == {"op": "take", "axis": -2, "index": [1, 2]}
    trains_on(out, x, y)


@pytest.mark.parametrize("name,args,msg", [
    ("norms", ["widen", "--layer", "stem", "--to", "12"],
     "cannot widen 'stem' through 'gn': GroupNormalization normalises across channels"),
    ("norms", ["delete-channels", "--layer", "stem", "--channels", "0,1"],
     "cannot delete channels of 'stem' through 'gn': GroupNormalization has groups=4 and the new width 6"),
    ("norms", ["widen", "--layer", "out", "--to", "4"], "reaches the model output 'out'"),
    ("norms", ["widen", "--layer", "gn", "--to", "9"], "it is a GroupNormalization layer; widen supports"),
    ("refuse", ["widen", "--layer", "a", "--to", "6"],
     "cannot widen 'a' through 'ln': LayerNormalization normalises across channels"),
    ("refuse", ["delete-channels", "--layer", "a", "--channels", "1"],
     "cannot delete channels of 'a' through 'grouped': grouped convolutions are not supported"),
    ("refuse", ["widen", "--layer", "b", "--to", "6"], "reaches 'sm', a Softmax layer that cannot"),
    ("refuse", ["widen", "--layer", "c", "--to", "6"], "'act' applies softmax across channels"),
    ("mha", ["widen", "--layer", "proj", "--to", "8"],
     "reaches 'mha', a MultiHeadAttention layer that cannot follow a channel change"),
    ("mha", ["delete-heads", "--layer", "mha", "--heads", "0,1,2"], "delete between 1 and 2 heads"),
    ("mha", ["prune-heads", "--layer", "proj", "--fraction", "0.5"],
     "it is a Dense layer; heads are edited on MultiHeadAttention layers"),
    ("nest", ["widen", "--layer", "inner", "--to", "8"],
     "it is a nested model; name a layer inside it as inner/<layer>"),
], ids=["widen-gn", "groups", "output", "not-producer", "widen-ln", "grouped", "softmax-layer",
        "softmax-act", "mha-follow", "heads-all", "heads-not-mha", "nested-by-name"])
def test_refusals_name_layer_and_reason(trained, tmp_path, name, args, msg):
    path = trained(name)[0]
    out = tmp_path / "never.keras"
    r = run_cli(args[0], path, *args[1:], "-o", out)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("surgeon: error: ") and msg in r.output, r.output
    assert not out.exists()


def test_prune_heads_equals_zeroed_output_rows_and_trains_on(trained, chain):
    """Pruning a head equals zeroing its rows of the output projection; its query/key/value
    slices and rows go, with their slots; nothing downstream changes."""
    path, _, x, y, _, model = trained("mha")
    ((plan, out),) = chain("mha", (S.plan_prune_heads, dict(layer="mha", fraction=0.34)))
    drop = plan.params["heads"]
    assert len(drop) == 1 and drop == [int(np.argmin(S.head_scores(path, "mha")))]
    keep = [h for h in range(3) if h not in drop]
    old, new = tensors(path), tensors(out)
    for v, sl in (("query/kernel", (slice(None), keep)), ("value/bias", (keep,)),
                  ("attention_output/kernel", (keep,))):
        for k in (f"mha/{v}", f"optimizer/mha/{v}/momentum", f"optimizer/mha/{v}/velocity"):
            np.testing.assert_array_equal(new[k], old[k][sl])
    assert_untouched_identical(plan, old, new)
    o = model.get_layer("mha")._output_dense.kernel
    k0 = np.asarray(o)
    try:
        k = k0.copy()
        k[drop] = 0
        o.assign(k)
        ref = np.asarray(model(x, training=False))
    finally:
        o.assign(k0)
    trains_on(out, x, y, ref)


NEST = ((W, dict(layer="pre", to=7)),        # into a nested Sequential (its Input follows)
        (W, dict(layer="inner/a", to=8)),    # inside it, out of it into the outer consumer
        (D, dict(layer="inner/a", channels=[0, 5])))


def test_nested_models_followed_inside(trained, chain, tmp_path):
    path, _, x, y, ref, _ = trained("nest")
    done = chain("nest", *NEST)
    (p1, o1), (p2, o2), (p3, o3) = done
    assert p1.changed_layers == ["pre", "inner/a"] and p2.changed_layers == ["inner/a", "out"]
    old, mid = tensors(path), tensors(o1)
    idx = p1.actions["pre/kernel"].steps[0]["index"]
    c = np.bincount(idx, minlength=4)[idx]
    np.testing.assert_allclose(mid["inner/a/kernel"], old["inner/a/kernel"][idx] / c[:, None], rtol=1e-6)
    np.testing.assert_array_equal(mid["optimizer/inner/a/kernel/momentum"],
                                  old["optimizer/inner/a/kernel/momentum"][idx])
    prev = old
    for plan, out in done:
        cur = tensors(out)
        assert_untouched_identical(plan, prev, cur)
        prev = cur
    trains_on(o2, x, y, ref)  # both widenings: function preserved
    trains_on(o3, x, y)
    # out of a nested Functional (a committed fixture trained with AdamW)
    src = FIXTURES / "nested_adamw.keras"
    out = tmp_path / "nested_wide.keras"
    S.execute(S.plan_widen(src, "backbone/fc2", 11), out)
    xs = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    a, b = outputs(src, xs), outputs(out, xs)
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())


MNV2 = ((W, dict(layer="block_3_expand", to=60)), (P, dict(layer="block_2_expand", fraction=0.25)))


def test_mobilenetv2_widen_and_prune_expansions(trained, chain):
    """keras.applications.MobileNetV2 (alpha 0.35, 32x32, Adam): widen an inverted-residual
    block's expansion (through BN, ReLU6, ZeroPadding and the depthwise conv), then prune
    another's. Pruning a channel of ``block_2_expand`` equals zeroing its rows of
    ``block_2_project`` (everything between is per-channel), widening preserves the
    function: the result must equal the trained model with those rows zeroed."""
    path, _, x, y, _, model = trained("mnv2")
    (wplan, wide), (pplan, out) = chain("mnv2", *MNV2)
    assert {"block_3_expand_BN", "block_3_depthwise", "block_3_depthwise_BN",
            "block_3_project"} <= set(wplan.changed_layers)
    assert {"block_2_expand_BN", "block_2_depthwise", "block_2_project"} <= set(pplan.changed_layers)
    old, mid, new = tensors(path), tensors(wide), tensors(out)
    assert_untouched_identical(wplan, old, mid)
    assert_untouched_identical(pplan, mid, new)
    drop = pplan.params["channels"]
    keep = [i for i in range(48) if i not in drop]
    for v in ("block_2_depthwise/kernel", "optimizer/block_2_depthwise/kernel/velocity"):
        np.testing.assert_array_equal(new[v], old[v][:, :, keep])
    np.testing.assert_array_equal(new["block_2_project/kernel"], old["block_2_project/kernel"][:, :, keep])
    proj = model.get_layer("block_2_project")
    k0 = np.asarray(proj.kernel)
    try:
        k = k0.copy()
        k[:, :, drop, :] = 0
        proj.kernel.assign(k)
        ref = np.asarray(model(x, training=False))
    finally:
        proj.kernel.assign(k0)
    trains_on(out, x, y, ref)
