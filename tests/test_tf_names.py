"""One canonical name per variable: a TF2 checkpoint of a Keras 3 model names its variables
as the model's ``.keras`` file does (layer names from the model, nested models prefixed by
their layer name, the top model's own name left out)."""
import json

import numpy as np
import pytest

from conftest import FIXTURES, run_cli


@pytest.fixture(scope="session")
def sequential(tmp_path_factory, keras):
    """A Sequential model trained 2 steps, saved as .keras and with tf.train.Checkpoint."""
    import tensorflow as tf
    from keras import layers
    out = tmp_path_factory.mktemp("seq")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([layers.Embedding(20, 4, name="tok"),
                              layers.GlobalAveragePooling1D(name="pool"),
                              layers.Dense(3, name="fc")], name="seq_sgd")
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="sparse_categorical_crossentropy")
    rs = np.random.RandomState(0)
    model.fit(rs.randint(0, 20, (8, 5)), rs.randint(0, 3, (8,)), batch_size=4, verbose=0)
    model.save(out / "seq.keras")
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(out / "ckpt" / "ckpt"))
    tf.saved_model.save(model, str(out / "saved"))
    return out / "seq.keras", prefix, model


def _diff(a, b, *extra):
    res = run_cli("diff", a, b, "--json", *extra)
    return res.exit_code, json.loads(res.output)


def test_sequential_checkpoint_names_match_keras(sequential):
    keras_file, prefix, model = sequential
    code, out = _diff(keras_file, prefix)
    assert code == 0, out
    assert out["equal"] is True
    import surgeon
    with surgeon.open_checkpoint(prefix) as ck:
        names = {e.name for e in ck.entries()}
        roles = {e.role for e in ck.entries()}
    assert {"tok/embeddings", "fc/kernel", "fc/bias"} <= names
    assert not any(n.startswith("seq_sgd/") for n in names)
    assert {"param", "slot", "optimizer"} <= roles
    # Keras' own variables, named without the model's name, are all there
    assert {v.path.split("/", 1)[1] for v in model.trainable_variables} <= names


def test_sequential_saved_model_names_match_keras(sequential):
    keras_file, prefix, _ = sequential
    import surgeon
    saved = prefix.rsplit("/", 2)[0] + "/saved"
    with surgeon.open_checkpoint(keras_file) as a, surgeon.open_checkpoint(saved) as b:
        want = {e.name for e in a.entries() if e.role in ("param", "state")}
        got = {e.name for e in b.entries() if e.role in ("param", "state")}
    assert want == got


NESTED = (FIXTURES / "nested_adamw.keras", FIXTURES / "tf" / "keras3_nested_adamw")


@pytest.mark.parametrize("order", ["keras-first", "ckpt-first"])
def test_nested_functional_checkpoint_equals_its_keras_file(order):
    """The TF checkpoint does not record 'backbone'; compared with the .keras file, it is
    named from that file's config, so the same trained model is "equal"."""
    a, b = NESTED if order == "keras-first" else NESTED[::-1]
    code, out = _diff(a, b)
    assert code == 0 and out["equal"] is True, out


def test_nested_functional_names_with_model():
    import surgeon
    with surgeon.open_checkpoint(NESTED[1], model=NESTED[0]) as b, \
            surgeon.open_checkpoint(NESTED[0]) as a:
        assert [e.name for e in b.entries()] and {e.name for e in a.entries()} == {
            e.name for e in b.entries()}
        assert "backbone/fc1/kernel" in {e.name for e in b.entries()}
        assert not any("nested models" in n for n in b.mapping.notes)
    with surgeon.open_checkpoint(NESTED[1]) as b:  # alone: the name is not recorded
        assert "fc1/kernel" in {e.name for e in b.entries()}
        assert any("--model" in n for n in b.mapping.notes)


def test_misfitting_model_does_not_rename(tmp_path):
    """A config whose layers do not fit the checkpoint names nothing (paths kept)."""
    import surgeon
    with surgeon.open_checkpoint(NESTED[1], model=FIXTURES / "cnn_adam.keras") as b:
        names = {e.name for e in b.entries()}
    assert "fc1/kernel" in names and not any(n.startswith("backbone/") for n in names)


def test_convert_nested_keras_to_checkpoint_pairs_by_name(tmp_path):
    """convert .keras -> TF checkpoint pairs every weight by its canonical name (never by
    layer order) and the result diffs "equal" against its source."""
    from surgeon.convert import convert
    report = convert(NESTED[0], tmp_path / "out.ckpt")
    hows = {p.target: p.how for p in report.pairs}
    assert hows["backbone/fc1/kernel"] == "name"
    assert "order" not in hows.values()
    written = next(tmp_path.glob("out.ckpt*.index"))
    code, out = _diff(NESTED[0], str(written)[:-len(".index")])
    assert code == 0 and out["equal"] is True, out
