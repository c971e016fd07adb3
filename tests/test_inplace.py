"""``apply``/``transplant --in-place`` (issue 14, goal 2): edits written where the file lies,
only the changed bytes, crash-safe through a rollback journal (surgeon/core/journal.py)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, fixture, load_keras_model, run_cli
from surgeon import open_checkpoint
from surgeon.core import journal
from surgeon.formats.provenance import input_digest

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
KERAS, WEIGHTS, LEGACY = fixture("cnn_adam.keras"), fixture("cnn_adam.weights.h5"), \
    fixture("legacy/k3_cnn_adam.h5")
RESCALE = ("from surgeon.recipe import recipe, rescale\n"
           "RECIPE = recipe(ops=[rescale('conv1/*', factor=0.5, slots='follow')])\n")


def _recipe(tmp_path, text=RESCALE, name="r.py"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _copy(src, tmp_path, name=None):
    dst = tmp_path / (name or Path(src).name)
    shutil.copyfile(src, dst)
    return dst


def _tensors(path, model=None):
    with open_checkpoint(path, model=model) as ck:
        return {e.name: ck.read(e.name) for e in ck.entries()}


# -- the crash test -------------------------------------------------------------------------
def test_sigkill_at_random_points_leaves_the_old_or_the_new_file(tmp_path):
    """>= 50 SIGKILLs at random points (chosen journal steps, half-done writes, random
    moments) per .keras, plus the two H5 formats: after the rollback every surgeon command
    does on open, the file is bit-identical to the old or the new version, never a mix."""
    recipe = _recipe(tmp_path)
    shm = Path("/dev/shm")  # fsync is free there; SIGKILL safety does not depend on it
    work = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path))
    cases = [f"{KERAS}::{recipe}::::60", f"{WEIGHTS}::{recipe}::{KERAS}::12",
             f"{LEGACY}::{recipe}::::12"]
    res = subprocess.run([PY, str(ROOT / "tests" / "inplace_crash_worker.py"), str(work), "14",
                          *cases], capture_output=True, text=True, env=ENV, timeout=300)
    shutil.rmtree(work, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-3000:]
    results = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["file"] for r in results] == [KERAS.name, WEIGHTS.name, LEGACY.name]
    assert "tensorflow" not in res.stderr.lower()
    for r in results:
        assert r["mixed"] == [], r
        assert r["old"] + r["new"] == r["trials"], r
        assert r["said"] >= 1, r  # rollbacks happened, and were announced
    assert results[0]["trials"] >= 50
    assert sum(r["new"] for r in results) >= 1 and sum(r["old"] for r in results) >= 1


def test_journal_is_rolled_back_on_open_and_says_so(tmp_path):
    """Killed half-way through patching the file: the file is a mix and the journal is
    complete; the next surgeon command (here `ls`) restores the old bytes, in one line."""
    path = _copy(KERAS, tmp_path)
    old = path.read_bytes()
    res = subprocess.run([PY, "-m", "surgeon", "apply", str(_recipe(tmp_path)), "-i", str(path),
                          "--in-place"], capture_output=True, text=True,
                         env={**ENV, "SURGEON_TEST_CRASH_AT": "patch:half"}, timeout=120)
    assert res.returncode == -9, res.stderr[-2000:]
    assert journal.journal_path(path).exists() and path.read_bytes() != old
    out = run_cli("ls", path)
    assert out.exit_code == 0, out.output
    said = [line for line in out.stderr.splitlines() if "rolled back" in line]
    assert said == [f"surgeon: {path}: rolled back an interrupted in-place edit "
                    f"(journal {journal.journal_path(path)})"]
    assert path.read_bytes() == old and not journal.journal_path(path).exists()


def test_incomplete_journal_is_dropped_without_touching_the_file(tmp_path):
    path = _copy(WEIGHTS, tmp_path)
    old = path.read_bytes()
    journal.journal_path(path).write_bytes(journal.MAGIC + b"\0" * 20)  # died mid-journal
    out = run_cli("ls", path)
    assert out.exit_code == 0 and "incomplete journal" in out.stderr
    assert path.read_bytes() == old and not journal.journal_path(path).exists()


def test_keras_zip_crc_is_updated_in_both_headers(tmp_path):
    """TF-free: after an in-place edit every member's CRC checks, from the central
    directory (what zipfile and Keras read) and from the weights' local header."""
    import struct
    import zlib
    path = _copy(KERAS, tmp_path)
    assert run_cli("apply", _recipe(tmp_path), "-i", path, "--in-place").exit_code == 0
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        info = zf.getinfo("model.weights.h5")
        data = zf.read(info)
    raw = path.read_bytes()
    local_crc = struct.unpack_from("<L", raw, info.header_offset + 14)[0]
    assert info.CRC == local_crc == zlib.crc32(data)
    assert data != zipfile.ZipFile(KERAS).read("model.weights.h5")


# -- Keras loads the edited file -------------------------------------------------------------
@pytest.mark.parametrize("src,model", [(KERAS, None), (WEIGHTS, KERAS), (LEGACY, None)],
                         ids=["keras", "weights-h5", "legacy-h5"])
def test_keras_loads_in_place_edit_with_the_edited_values(tmp_path, keras, src, model):
    path = _copy(src, tmp_path)
    before = _tensors(src, model)
    args = ["apply", _recipe(tmp_path), "-i", path, "--in-place"] + (["--model", model] if model else [])
    out = run_cli(*args)
    assert out.exit_code == 0, out.output
    assert f"edited {path} in place" in out.stdout
    after = _tensors(path, model)
    assert after.keys() == before.keys()
    for name, old in before.items():
        if name.startswith("conv1/"):
            np.testing.assert_array_equal(after[name], old * np.float32(0.5))
        elif "conv1/" not in name or not name.startswith("optimizer/"):
            np.testing.assert_array_equal(after[name], old, err_msg=name)
    # the same edit written as a new file holds the same tensors
    run_cli(*(["apply", _recipe(tmp_path), "-i", src, "-o", tmp_path / f"new_{Path(src).name}"]
              + (["--model", model] if model else [])))
    new = _tensors(tmp_path / f"new_{Path(src).name}", model)
    for name in before:
        np.testing.assert_array_equal(after[name], new[name], err_msg=name)
    m = load_keras_model(path, weights_of=model)
    kernel = next(w for w in m.weights if w.path.endswith("conv1/kernel"))
    np.testing.assert_array_equal(np.asarray(kernel), before["conv1/kernel"] * np.float32(0.5))
    log = json.loads(run_cli("log", path, "--json").stdout)
    assert log[-1]["in_place"] is True and log[-1]["inputs"][0]["sha256"] is None
    if src == KERAS:
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None  # every member's CRC (the patched one) checks


@pytest.fixture(scope="module")
def big_keras(tmp_path_factory, keras):
    """A 3 MB .keras (Dense(512) trained one step with Adam) with a tiny head."""
    tf_keras = keras
    model = tf_keras.Sequential([tf_keras.Input((512,)), tf_keras.layers.Dense(512, name="body"),
                                 tf_keras.layers.Dense(2, name="head")])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(8, 512)), rng.normal(size=(8, 2)), epochs=1, verbose=0)
    path = tmp_path_factory.mktemp("big") / "big.keras"
    model.save(path)
    return path


def test_in_place_writes_only_the_bytes_it_changes(tmp_path, big_keras):
    path = _copy(big_keras, tmp_path)
    old = path.read_bytes()
    text = RESCALE.replace("conv1/*", "head/*")
    out = run_cli("transplant", big_keras, path, "--layers", "head", "--in-place", "--iteration", "7")
    assert out.exit_code == 0, out.output
    out = run_cli("apply", _recipe(tmp_path, text), "-i", path, "--in-place", "--json")
    written = json.loads(out.stdout)["written"]
    assert written["in_place"] and written["bytes_written"] < 64 * 1024 < len(old) // 40
    new = path.read_bytes()
    same = min(len(old), len(new))
    changed = np.flatnonzero(np.frombuffer(old[:same], np.uint8) != np.frombuffer(new[:same], np.uint8))
    assert changed.size < 16 * 1024  # the head, its slots, CRC, the log: not the body
    log = json.loads(run_cli("log", path, "--json").stdout)
    assert [r["command"] for r in log] == ["transplant", "apply"]
    src = log[0]["inputs"][1]
    assert src["role"].startswith("source:") and len(input_digest(src)[1]) == 64
    m = load_keras_model(path)
    assert int(m.optimizer.iterations.numpy()) == 7


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("what,args_text,expect", [
    ("cast", "from surgeon.recipe import recipe, cast\n"
             "RECIPE = recipe(ops=[cast('conv1/*', dtype='float16')])\n", "cast changes tensor dtypes"),
    ("structural", "from surgeon.recipe import recipe, widen\n"
                   "RECIPE = recipe(ops=[widen(layer='fc1', to=12)])\n",
     "the structural op widen changes the model's structure"),
    ("output", RESCALE, "--in-place writes the input itself"),
    ("sharded", RESCALE, "keras-weights-sharded files are not supported"),
    ("compressed", RESCALE, "its model.weights.h5 member is compressed"),
])
def test_refusals_name_why_and_touch_nothing(tmp_path, what, args_text, expect):
    path = _copy(KERAS, tmp_path)
    extra = []
    if what == "output":
        extra = ["-o", tmp_path / "other.keras"]
    if what == "sharded":
        for p in fixture("cnn_adam.keras").parent.glob("cnn_adam_sharded*"):
            _copy(p, tmp_path)
        path = tmp_path / "cnn_adam_sharded.weights.json"
        extra = ["--model", KERAS]
    if what == "compressed":
        with zipfile.ZipFile(KERAS) as zi, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zo:
            for i in zi.infolist():
                zo.writestr(i.filename, zi.read(i))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    out = run_cli("apply", _recipe(tmp_path, args_text), "-i", path, "--in-place", *extra)
    assert out.exit_code == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgeon: error: ") and expect in lines[0], out.stderr
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name in before}
    assert after == before and not journal.journal_path(path).exists()


def test_transplant_needs_an_output_or_in_place(tmp_path):
    out = run_cli("transplant", KERAS, _copy(KERAS, tmp_path))
    assert out.exit_code == 2 and "--in-place" in out.stderr


def _commit_image(base: bytes, spans, tail, new_tail: bytes, new_size: int) -> bytes:
    """What ``journal.commit`` makes of the file ``base`` from ``Overlay.changes``."""
    out = bytearray(base)
    for off, old, new in spans:
        assert old == base[off:off + len(old)] and off + len(new) <= tail
        out[off:off + len(new)] = new
    out[tail:] = new_tail
    return bytes(out[:new_size].ljust(new_size, b"\0"))


def test_overlay_sees_and_commits_exactly_what_was_written(tmp_path):
    """Random writes (new bytes, the old bytes again, across page edges, past the end),
    truncations and reads on an ``Overlay``: every read (``pread``, ``readinto``) sees the
    file as written, ``changes`` gives the ranges that make it from the old file, and
    pages rewritten with their old bytes give no range at all."""
    rng, page, path = np.random.default_rng(14), journal.PAGE, tmp_path / "f.bin"
    for trial in range(40):
        base = rng.integers(0, 256, int(rng.integers(1, 5 * page)), dtype=np.uint8).tobytes()
        path.write_bytes(base)
        ov, want, only_same = journal.Overlay(path), bytearray(base), True
        for _ in range(int(rng.integers(1, 8))):
            off, n = int(rng.integers(0, len(want) + page // 2)), int(rng.integers(0, 3 * page))
            if rng.random() < 0.15:
                ov.truncate(off)
                want = want[:off].ljust(off, b"\0")
                only_same = False
                continue
            same = rng.random() < 0.4 and off + n <= len(want)
            data = bytes(want[off:off + n]) if same else rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            only_same &= same
            ov.pwrite(off, data)
            want = want.ljust(off, b"\0")
            want[off:off + n] = data
            a, k = int(rng.integers(0, len(want))), int(rng.integers(0, 2 * page))
            buf = bytearray(k)
            ov.seek(a)
            got = ov.readinto(buf)
            assert ov.pread(a, k) == want[a:a + k] == buf[:got]
        spans, tail = ov.changes()
        new_tail = ov.pread(tail, ov.size - tail) if ov.size > tail else b""
        assert _commit_image(base, spans, tail, new_tail, ov.size) == want, trial
        if only_same:
            assert spans == [] and ov.size == len(base), trial
        ov.close()
