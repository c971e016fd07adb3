"""Issue 14 goal 1: the one-tensor edit's copy and content hashes (surgeon.core.fastio) and
the input cloned in the background during start-up (surgeon.formats.clone)."""
import hashlib
import importlib.util
import os
import threading
import zipfile

import numpy as np
import pytest

from conftest import ROOT, fixture, load_keras_model, run_cli
from recipe_helpers import read_all
from surgeon.core import fastio
from surgeon.formats import clone as clone_mod
from surgeon.formats.provenance import hash_algorithm, input_digest, read_log
from surgeon.recipe import recipe, rescale
from surgeon.recipe.execute import apply

CNN = fixture("cnn_adam.keras")


def expected_digest(path, algorithm=None):
    """``(algorithm, hex digest)`` of a file as a new surgery log should record it,
    computed here independently (hashlib, or the blake3 package itself)."""
    algorithm = algorithm or hash_algorithm()
    if algorithm == "blake3":
        import blake3
        return algorithm, blake3.blake3(path.read_bytes()).hexdigest()
    return algorithm, hashlib.new(algorithm, path.read_bytes()).hexdigest()


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
    assert input_digest(read_log(out)[-1]["inputs"][0]) == expected_digest(CNN)
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
    inputs = {i["path"]: input_digest(i) for i in read_log(out)[-1]["inputs"]}
    assert inputs == {str(p): expected_digest(p) for p in (src, dst)}
    a, b = read_all(src), read_all(out)
    np.testing.assert_array_equal(b["conv1/kernel"], a["conv1/kernel"])
    assert _surgeon_temps(tmp_path) == []


# -- the content hash names its algorithm; the command line starts the work early ----------
HASHES = ["sha256", pytest.param("blake3", marks=pytest.mark.skipif(
    importlib.util.find_spec("blake3") is None, reason="the fasthash extra (blake3) is not installed"))]


@pytest.mark.parametrize("algorithm", HASHES)
def test_input_hash_is_recorded_under_its_algorithm(tmp_path, monkeypatch, algorithm):
    """SURGEON_HASH picks the content hash; the record stores the digest under the
    algorithm's own name (sha256 stays a key: null unless it is the one), the digest is
    the file's (checked with hashlib / the blake3 package), and ``surgeon log`` says
    which hash it shows."""
    monkeypatch.setenv("SURGEON_HASH", algorithm)
    src, out = fixture("cnn_sgdm.keras"), tmp_path / "t.keras"
    res = run_cli("transplant", src, CNN, "-o", out, "--layers", "conv1")
    assert res.exit_code == 0, res.output
    inputs = read_log(out)[-1]["inputs"]
    assert [input_digest(i) for i in inputs] == [expected_digest(p, algorithm) for p in (CNN, src)]
    assert all(set(i) & {"sha256", "blake3"} == {"sha256", algorithm} for i in inputs)
    shown = run_cli("log", out).output
    digest = expected_digest(CNN, algorithm)[1][:12]
    assert (f"(blake3 {digest})" if algorithm == "blake3" else f"({digest})") in shown, shown


def test_unknown_hash_algorithm_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_HASH", "md5")
    out = tmp_path / "o.keras"
    res = run_cli("apply", _rescale_recipe(tmp_path), "-i", CNN, "-o", out, "--no-progress")
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "surgeon: error: SURGEON_HASH='md5': use sha256 or blake3"]
    assert not out.exists() and _surgeon_temps(tmp_path) == []


def _rescale_recipe(tmp_path, extra=""):
    p = tmp_path / "rescale_head.py"
    p.write_text("from surgeon.recipe import recipe, rescale, cast\n"
                 f"RECIPE = recipe(ops=[rescale('head/*', factor=0.5){extra}])\n")
    return p


def _members(path):
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i.filename) for i in zf.infolist()
                if i.filename != "surgeon/provenance.json"}


def test_command_line_early_clone_gives_the_library_output(tmp_path):
    """The CLI starts cloning -i to -o before the recipe is loaded; the output is the
    library's (every zip member byte for byte, the log aside), also when --set input
    names another file than -i (the early clone of -i is dropped, not patched)."""
    recipe_file = _rescale_recipe(tmp_path)
    lib = tmp_path / "lib.keras"
    apply(recipe(input=str(CNN), output=str(lib), ops=[rescale("head/*", factor=0.5)]))
    for i, args in enumerate([("-i", CNN), ("-i", fixture("cnn_sgdm.keras"), "--set", f"input={CNN}")]):
        out = tmp_path / f"cli{i}.keras"
        res = run_cli("apply", recipe_file, *args, "-o", out, "--no-progress")
        assert res.exit_code == 0, res.output
        assert _members(out) == _members(lib), args
        assert read_log(out)[-1]["inputs"][0]["path"] == str(CNN)
    assert _surgeon_temps(tmp_path) == []


def test_early_clone_is_dropped_when_the_output_is_rebuilt(tmp_path):
    """A cast changes a dtype: the output is rebuilt, not patched; the clone the command
    line started is removed and the output is right."""
    out = tmp_path / "c.keras"
    res = run_cli("apply", _rescale_recipe(tmp_path, ", cast('conv1/kernel', dtype='float16')"),
                  "-i", CNN, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert read_all(out)["conv1/kernel"].dtype == np.float16
    assert _surgeon_temps(tmp_path) == []


# -- a .keras clone stops at the end of the weights member; no truncate waits for it -----
class _TruncateCounter:
    """The patch writer's clone file, counting ``truncate`` calls (each an ftruncate that
    waits for the writeback of the file's last pages)."""

    def __init__(self, f, calls):
        self._f, self._calls = f, calls

    def truncate(self, *args):
        self._calls.append(args)
        return self._f.truncate(*args)

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_keras_clone_stops_at_the_weights_member_and_is_not_truncated(tmp_path, monkeypatch):
    """The early clone of a ``.keras`` copies the file up to the end of its weights
    member's data (the members after it and the central directory are rewritten), so the
    patch writer cuts nothing off it (an ftruncate of a file under writeback waits for
    it: 0.07-0.4 s measured on 1.2 GB); the output is exact."""
    from surgeon.formats import keras_patch
    length = clone_mod.clone_length(CNN)
    with zipfile.ZipFile(CNN) as zf:
        weights = zf.read(clone_mod.WEIGHTS)
    data = CNN.read_bytes()
    assert len(data) > length and data[length - len(weights):length] == weights
    calls = []
    real_open = open
    monkeypatch.setattr(keras_patch, "open", lambda *a, **k: _TruncateCounter(real_open(*a, **k), calls),
                        raising=False)
    out = tmp_path / "o.keras"
    apply(recipe(input=str(CNN), output=str(out), ops=[rescale("head/kernel", factor=0.5)]))
    assert calls == []
    a, b = read_all(CNN), read_all(out)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k] * np.float32(0.5) if k == "head/kernel" else a[k])
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None


def test_short_clone_is_copied_again_not_padded(tmp_path):
    """A clone shorter than the member's end (the input changed meanwhile, or a wrong
    length) is copied again, never extended with zeros: the output is the library's."""
    lib, out = tmp_path / "lib.keras", tmp_path / "o.keras"
    ops = [rescale("head/*", factor=0.5)]
    apply(recipe(input=str(CNN), output=str(lib), ops=ops))
    with clone_mod.EarlyStart(hash_inputs=False) as early:
        early.clone = clone_mod.BackgroundClone(CNN, out, clone_mod.clone_length(CNN) // 2)
        apply(recipe(input=str(CNN), output=str(out), ops=ops), early=early)
    assert _members(out) == _members(lib)
    assert _surgeon_temps(tmp_path) == []


def test_reading_an_h5_file_from_the_command_line_runs_no_child_process(tmp_path):
    """Importing h5py indexes ``platform.uname()``, which on Linux runs ``uname -p`` in a
    child process (a fork of the interpreter: ~50 ms of every command); the CLI imports
    h5py without it, and ``platform`` is untouched afterwards."""
    import subprocess
    import sys
    code = ("import sys\n"
            "sys.addaudithook(lambda ev, a: ev == 'subprocess.Popen' and print('CHILD', a[1], file=sys.stderr))\n"
            f"sys.argv = ['surgeon', 'ls', {str(CNN)!r}]\n"
            "import atexit, platform\n"
            "atexit.register(lambda: print('UNAME', type(platform.uname()).__name__, platform.uname().machine))\n"
            "from surgeon.cli import run\nrun()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "CHILD" not in res.stderr and "total:" in res.stdout
    assert f"UNAME uname_result {os.uname().machine}" in res.stdout


def test_full_rewrite_written_behind_equals_the_rebuilt_output(tmp_path, monkeypatch):
    """Every param rescaled, slots following, with every tensor written by the background
    thread (``rawbehind``, threshold lowered): the clone-and-patch output holds the same
    tensors as the rebuilding writer's and its zip CRCs are right (``testzip``)."""
    from surgeon.formats import rawbehind
    monkeypatch.setattr(rawbehind, "BEHIND_MIN", 1)
    monkeypatch.setattr(rawbehind, "PENDING", 4096)
    outs = {}
    for patch in (True, False):
        outs[patch] = tmp_path / f"o{patch}.keras"
        apply(recipe(input=str(CNN), output=str(outs[patch]),
                     ops=[rescale("*", factor=0.5, slots="follow")]), patch=patch)
    with zipfile.ZipFile(outs[True]) as zf:
        assert zf.testzip() is None
    a, b, src = read_all(outs[True]), read_all(outs[False]), read_all(CNN)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(not np.array_equal(a[k], src[k]) for k in a if "velocity" in k)


def test_fast_crc32_is_zlibs():
    """``fastio.crc32`` (ISA-L when the fastcrc extra is installed) gives zlib's values,
    for any length and running value (as the CRC of a member is continued block by block)."""
    import zlib
    rng = np.random.default_rng(5)
    for n, start in ((0, 0), (1, 7), (4095, 0xFFFFFFFF), (70_001, 0x1234ABCD)):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert fastio.crc32(data, start) == zlib.crc32(data, start)
        assert fastio.crc32(data.tobytes()) == zlib.crc32(data.tobytes())
