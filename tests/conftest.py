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
# With CI (or BUILD_NUMBER) set, pytest diffs a failing `==` of long sequences in full
# (difflib.ndiff, quadratic): a failing comparison of two files' bytes then runs for many
# minutes instead of failing (a planted bug timed out so in CI). Failures are explained by
# pytest_assertrepr_compare below instead.
for _var in ("CI", "BUILD_NUMBER"):
    os.environ.pop(_var, None)
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
REALWORLD = FIXTURES / "realworld"
sys.path.insert(0, str(FIXTURES))
# The test session trains with TensorFlow-backed Keras: in-process CLI calls never load
# Keras on its light backend here (fresh `surgeon` subprocesses do; see core/tf.py).
import surgeon.core.tf  # noqa: E402

surgeon.core.tf.LIGHT_ALLOWED = False

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


@pytest.fixture(scope="session")
def sharded_ckpt(tmp_path_factory, keras):
    """A real Keras model trained a few steps with Adam, saved in >= 8 weight shards
    (``tiny.weights.json``, its ``tiny.keras``), and its fine-tune (one more epoch,
    ``tuned.weights.json``, same shards): the executor tests' checkpoints (issue 18)."""
    import numpy as np
    d = tmp_path_factory.mktemp("sharded")
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((6,))] + [keras.layers.Dense(6, name=f"d{i}") for i in range(4)]
                         + [keras.layers.Dense(2, name="head")])
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 6), "float32"), rng.random((16, 2), "float32")
    m.fit(x, y, epochs=1, batch_size=8, verbose=0)
    m.save(d / "tiny.keras")
    m.save_weights(d / "tiny.weights.json", max_shard_size=300e-9)
    assert len(list(d.glob("tiny_*.weights.h5"))) >= 8
    m.fit(x, y, epochs=1, batch_size=8, verbose=0)
    m.save_weights(d / "tuned.weights.json", max_shard_size=300e-9)
    return d


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (2 CPUs on 127.0.0.1), started once per session."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


_LAST_RAY_USER = []


def pytest_collection_modifyitems(config, items):
    users = [i.nodeid for i in items if "ray_cluster" in getattr(i, "fixturenames", ())]
    _LAST_RAY_USER[:] = users[-1:]


def pytest_runtest_teardown(item, nextitem):
    """Stop the session's Ray cluster after its last user: its daemons would otherwise idle
    through the rest of the suite (the fixture's own teardown is then a no-op)."""
    if _LAST_RAY_USER and item.nodeid == _LAST_RAY_USER[0] and "ray" in sys.modules:
        sys.modules["ray"].shutdown()


def pytest_assertrepr_compare(config, op, left, right):
    """For ``==`` on long byte strings and sequences: where they first differ (pytest's own
    explanation, outside CI mode, only says "Use -v to get more diff")."""
    if op != "==":
        return None
    if isinstance(left, (bytes, bytearray)) and isinstance(right, (bytes, bytearray)):
        import numpy as np
        n = min(len(left), len(right))
        differ = np.flatnonzero(np.frombuffer(left, np.uint8, n) != np.frombuffer(right, np.uint8, n))
        i = int(differ[0]) if differ.size else n
        return [f"byte strings of {len(left)} and {len(right)} bytes",
                f"first difference at offset {i}: {bytes(left[i:i + 16])!r} != {bytes(right[i:i + 16])!r}"]
    if (isinstance(left, (list, tuple)) and isinstance(right, (list, tuple))
            and max(len(left), len(right)) > 200):
        n = min(len(left), len(right))
        i = next((k for k in range(n) if left[k] != right[k]), n)
        show = lambda s: repr(s[i]) if i < len(s) else "(end)"  # noqa: E731
        return [f"sequences of {len(left)} and {len(right)} items",
                f"first difference at index {i}: {show(left)[:200]} != {show(right)[:200]}"]
    return None
