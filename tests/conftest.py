"""Shared test helpers. Fixtures are real Keras-saved checkpoints in fixtures/."""
import os
import sys
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Before any TensorFlow import, here and in every subprocess (they inherit it): oneDNN's
# kernels (on by default on AVX-512/AMX Xeons) crash conv training with SIGSEGV there and
# make results CPU-dependent. surgeon itself does the same (surgeon/core/tf.py).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
REALWORLD = FIXTURES / "realworld"
sys.path.insert(0, str(FIXTURES))

COMBOS = ["cnn_adam", "cnn_sgdm", "cnn_rmsprop", "lstm_adam", "lstm_rmsprop",
          "nested_adamw", "nested_adagrad"]


def fixture(name):
    p = FIXTURES / name
    assert p.exists(), f"missing fixture {p}; run python fixtures/make_fixtures.py"
    return p


def realworld(relpath):
    p = REALWORLD / relpath
    if not p.exists():
        pytest.skip(f"{p} not present: run bash fixtures/fetch_realworld.sh (needs PyPI)")
    return p


@pytest.fixture(scope="session")
def keras():
    import keras as k
    return k


def load_keras_model(path, weights_of=None):
    """Load with Keras, failing on any warning (e.g. 'Skipping variable loading')."""
    import keras
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if weights_of is None:
            return keras.saving.load_model(path)
        model = keras.saving.load_model(weights_of)
        model.load_weights(path)
        return model


def run_cli(*args):
    from click.testing import CliRunner
    from surgeon.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def keras_canonical_names(model):
    """id(variable) -> surgeon's canonical name, from Keras' own variable paths (a nested
    model's weights are prefixed with its layer name; Keras 3 paths omit it)."""
    import keras
    out = {}
    for layer in model.layers:
        prefix = layer.name + "/" if isinstance(layer, keras.Model) else ""
        for w in layer.weights:
            out[id(w)] = w.path if w.path.startswith(prefix) else prefix + w.path
    return out


def _hash_tree(root):
    import hashlib
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] == "realworld" or not p.is_file() or "__pycache__" in rel.parts:
            continue
        out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session", autouse=True)
def fixtures_unchanged():
    """No test may write into fixtures/ (except fixtures/realworld, downloaded)."""
    before = _hash_tree(FIXTURES)
    yield
    after = _hash_tree(FIXTURES)
    changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    if changed:
        pytest.fail(f"the test session modified fixtures/: {', '.join(changed)}", pytrace=False)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """zoo(name) -> (trained Keras model, directory holding <name>.keras etc.), built once
    per session by tests/modern_zoo.py (tiny models saved by Keras itself)."""
    import modern_zoo
    built = {}
    root = tmp_path_factory.mktemp("zoo")

    def get(name):
        if name not in built:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = modern_zoo.BUILDERS[name]()
                built[name] = (model, modern_zoo.save(model, root, name))
        return built[name]
    return get
