"""Issue 14 goal 1: the one-tensor edit's copy and content hashes (surgeon.core.fastio) and
the input cloned in the background during start-up (surgeon.formats.clone)."""
import hashlib
import os
import threading

import numpy as np
import pytest

from conftest import fixture, load_keras_model, run_cli
from recipe_helpers import read_all
from surgeon.core import fastio
from surgeon.formats import clone as clone_mod
from surgeon.formats.provenance import read_log
from surgeon.recipe import recipe, rescale
from surgeon.recipe.execute import apply

CNN = fixture("cnn_adam.keras")


@pytest.mark.parametrize("size", [0, 1, fastio.CHUNK - 1, fastio.CHUNK + 3,
                                  fastio.FLUSH_EVERY + fastio.CHUNK + 7])
def test_copy_and_hash_are_exact_across_chunk_boundaries(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    os.chmod(src, 0o640)
    fastio.copy_file(src, dst)
    assert dst.read_bytes() == data and (os.stat(dst).st_mode & 0o777) == 0o640
    assert fastio.sha256_file(src) == hashlib.sha256(data).hexdigest()


def test_hash_and_copy_stop_when_cancelled(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * (fastio.CHUNK + 1))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(fastio.Cancelled):
        fastio.sha256_file(src, cancel)
    with pytest.raises(fastio.Cancelled):
        fastio.copy_file(src, tmp_path / "dst.bin", cancel)


def _surgeon_temps(folder):
    return [p for p in os.listdir(folder) if p.endswith(".surgeon-tmp")]


def test_background_clone_is_adopted_by_the_patch_writer(tmp_path, monkeypatch):
    """The input copy started before the input is opened is the one the writer patches
    (no second copy), and the output is exact: edited tensor rescaled, the rest kept."""
    taken = []
    real_take = clone_mod.BackgroundClone.take
    monkeypatch.setattr(clone_mod.BackgroundClone, "take",
                        lambda self: taken.append(self.tmp) or real_take(self))
    out = tmp_path / "o.keras"
    apply(recipe(input=str(CNN), output=str(out),
                 ops=[rescale("head/kernel", factor=0.5, slots="keep")]))
    assert len(taken) == 1 and not os.path.exists(taken[0]) and out.exists()
    a, b = read_all(CNN), read_all(out)
    for k in a:
        want = a[k] * np.float32(0.5) if k == "head/kernel" else a[k]
        np.testing.assert_array_equal(b[k], want, err_msg=k)
    assert read_log(out)[-1]["inputs"][0]["sha256"] == hashlib.sha256(CNN.read_bytes()).hexdigest()
    load_keras_model(out)
    assert _surgeon_temps(tmp_path) == []


def test_failed_run_removes_its_background_clone(tmp_path):
    out = tmp_path / "o.keras"
    res = run_cli("apply", _recipe_file(tmp_path), "-i", CNN, "-o", out, "--no-progress")
    assert res.exit_code == 2 and "surgeon: error:" in res.output
    assert not out.exists() and _surgeon_temps(tmp_path) == []


def _recipe_file(tmp_path):
    p = tmp_path / "bad.py"
    p.write_text("from surgeon.recipe import recipe, rescale\n"
                 "RECIPE = recipe(ops=[rescale('no_such_layer/*', factor=0.5)])\n")
    return p


def test_transplant_records_both_inputs_content_hashes(tmp_path):
    src, dst, out = fixture("cnn_sgdm.keras"), CNN, tmp_path / "t.keras"
    res = run_cli("transplant", src, dst, "-o", out, "--layers", "conv1")
    assert res.exit_code == 0, res.output
    inputs = {i["path"]: i["sha256"] for i in read_log(out)[-1]["inputs"]}
    assert inputs == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (src, dst)}
    a, b = read_all(src), read_all(out)
    np.testing.assert_array_equal(b["conv1/kernel"], a["conv1/kernel"])
    assert _surgeon_temps(tmp_path) == []
