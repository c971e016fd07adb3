"""Shared test helpers. Fixtures are real Keras-saved checkpoints in fixtures/."""
import os
import sys
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Before any TensorFlow import, here and in every subprocess (they inherit it): oneDNN's
# kernels (on by default on AVX-512/AMX Xeons) crash conv training with SIGSEGV there and
# make results CPU-dependent. surgeon itself does the same (surgeon/_tf.py).
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
