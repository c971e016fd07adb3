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
