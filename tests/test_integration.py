"""Cross-area flows: convert -> ls/diff across formats, relative output paths."""
import json
import subprocess
import sys

import numpy as np

from conftest import FIXTURES, ROOT, fixture
from surgeon import open_checkpoint


def _surgeon(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "surgeon", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_convert_to_relative_tf_prefix_then_read_back(tmp_path):
    """Regression: a relative checkpoint prefix lost its data shard when placed."""
    p = _surgeon("convert", fixture("cnn_adam.keras"), "out.ckpt", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out.ckpt.data-00000-of-00001", "out.ckpt.index"]
    with open_checkpoint(fixture("cnn_adam.keras")) as a, open_checkpoint(tmp_path / "out.ckpt") as b:
        ea = {e.name: e for e in a.entries()}
        eb = {e.name: e for e in b.entries()}
        for name, e in ea.items():
            assert name in eb, name
            assert (eb[name].role, eb[name].slot_of, eb[name].slot) == (e.role, e.slot_of, e.slot)
            np.testing.assert_array_equal(a.read(name), b.read(name))


def test_legacy_h5_and_its_converted_keras_diff_equal(tmp_path):
    src = FIXTURES / "legacy" / "k3_cnn_adam.h5"
    out = tmp_path / "converted.keras"
    p = _surgeon("convert", src, out)
    assert p.returncode == 0, p.stderr
    d = _surgeon("diff", src, out, "--json")
    assert d.returncode == 0, d.stdout + d.stderr
    report = json.loads(d.stdout)
    assert report["equal"] is True
    statuses = {t["status"] for t in report["tensors"]}
    assert statuses == {"equal"}
    assert any(t["name"].startswith("optimizer/") for t in report["tensors"])


def test_public_api_is_lazy():
    code = ("import sys, surgeon\n"
            "fns = [getattr(surgeon, n) for n in ('load_recipe', 'apply', 'diff_checkpoints',"
            " 'audit_checkpoint', 'convert_checkpoint')]\n"
            "assert all(callable(f) for f in fns)\n"
            "assert 'tensorflow' not in sys.modules\n"
            "assert callable(surgeon.resume)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr


def test_keras_to_tf_checkpoint_and_back_is_equal(tmp_path):
    """.keras -> TF2 checkpoint -> .keras (--like): weights, slots and iteration survive."""
    assert _surgeon("convert", fixture("cnn_adam.keras"), "mid.ckpt", cwd=tmp_path).returncode == 0
    p = _surgeon("convert", tmp_path / "mid.ckpt", tmp_path / "back.keras", "--like", fixture("cnn_adam.keras"))
    assert p.returncode == 0, p.stderr
    d = _surgeon("diff", fixture("cnn_adam.keras"), tmp_path / "back.keras")
    assert d.returncode == 0 and d.stdout.startswith("equal: 30 tensors compared"), d.stdout


def test_tf2_checkpoint_converts_to_keras_that_trains_on(tmp_path):
    from conftest import load_keras_model
    src = FIXTURES / "tf" / "keras3_cnn_adam"
    out = tmp_path / "from_tf.keras"
    p = _surgeon("convert", src, out, "--like", fixture("cnn_adam.keras"))
    assert p.returncode == 0, p.stderr
    model = load_keras_model(out)
    with open_checkpoint(src) as ck:
        iters = ck.metadata()["optimizer"]["iterations"]
        expect = {e.name: ck.read(e.name) for e in ck.entries() if e.role == "slot"}
    assert int(model.optimizer.iterations) == iters > 0
    with open_checkpoint(out) as ck:
        for name, value in expect.items():
            np.testing.assert_array_equal(ck.read(name), value)
    x = np.random.RandomState(0).rand(4, 8, 8, 3).astype("float32")
    model.fit(x, np.array([0, 1, 2, 0]), verbose=0)
    assert int(model.optimizer.iterations) == iters + 1
