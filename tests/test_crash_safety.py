"""Crash safety: SIGKILL mid-write, disk full, read-only output, output == input.

A ~16 MB Keras checkpoint with 24 Dense layers and Adam state (~150 tensors) is built once
per session. ``surgeon apply`` (a TOML recipe rewriting every param) runs in a subprocess
and is killed with SIGKILL inside its write window: once its own temp file exists, after a
delay spread evenly over the window an uninterrupted run takes from temp file to rename.
After each kill: the input is byte-identical, and the target is absent or a complete
checkpoint whose every tensor equals the uninterrupted run's. After the next successful
run no ``*.surgeon-tmp*`` file is left in the directory (killed runs' temps are named
``.<target>.<host>-<pid>.<random>.surgeon-tmp`` and the next successful write of the same
target removes those whose process is gone; see surgeon/core/atomic.py).
"""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SURGEON = [sys.executable, "-m", "surgeon"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
RECIPE = """
[[ops]]
op = "shrink_perturb"
select = { pattern = "*", role = "param" }
shrink = 0.5
perturb = 0.1
seed = 0
slots = "keep"
"""
TRIALS = {"h5": 26, "keras": 26}  # + 3 convert kills below: 55 kills per run


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def temps(directory):
    return sorted(n for n in os.listdir(directory) if ".surgeon-tmp" in n)


def read_all(path, model=None):
    import surgeon
    with surgeon.open_checkpoint(path, model=model) as ck:
        return {e.name: ck.read(e.name) for e in ck.entries()}


@pytest.fixture(scope="session")
def tower(tmp_path_factory):
    """A 24 x Dense(256) model with Adam state (iteration 7), as .keras and .weights.h5."""
    import keras
    d = tmp_path_factory.mktemp("tower")
    keras.utils.set_random_seed(0)
    inp = keras.Input((256,), name="x")
    h = inp
    for i in range(24):
        h = keras.layers.Dense(256, name=f"d{i}")(h)
    model = keras.Model(inp, h, name="tower")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    for v in model.optimizer.variables:
        if len(v.shape):
            v.assign(rng.normal(size=v.shape).astype("float32") ** 2)
    model.optimizer.iterations.assign(7)
    model.save(d / "tower.keras")
    model.save_weights(d / "tower.weights.h5")
    (d / "recipe.toml").write_text(RECIPE)
    return d


def _apply_args(d, fmt, out):
    if fmt == "h5":
        return [*SURGEON, "apply", str(d / "recipe.toml"), "-i", str(d / "tower.weights.h5"),
                "--model", str(d / "tower.keras"), "-o", str(out), "--no-progress"]
    return [*SURGEON, "apply", str(d / "recipe.toml"), "-i", str(d / "tower.keras"),
            "-o", str(out), "--no-progress"]


def _reference(cmd, out):
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    return elapsed


def _own_temp(proc, directory, timeout=120.0):
    """Wait until ``proc`` has created its temp file in ``directory`` (temps carry the pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [n for n in temps(directory) if f"-{proc.pid}." in n]
        if mine:
            return directory / mine[0]
        if proc.poll() is not None:
            return None
        time.sleep(0.002)
    return None


def _write_window(cmd, out):
    """Seconds from the moment the run's temp file exists until the target appears."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    tmp = _own_temp(proc, out.parent)
    t0 = time.monotonic()
    while not out.exists() and proc.poll() is None:
        time.sleep(0.002)
    window = time.monotonic() - t0
    _, err = proc.communicate()
    assert proc.returncode == 0 and tmp is not None, err
    return window


def _kill_trials(cmd, out, inputs, n, window, check):
    """Kill ``cmd`` n times, each inside its write window: once its temp file exists, after
    a delay spread over the window; check the state after each. A run that finished before
    its kill shows the window is shorter now (machine load varies): the estimate shrinks."""
    before = {p: sha(p) for p in inputs}
    outcomes = {"absent": 0, "complete": 0, "in_window": 0}
    for i in range(n):
        if out.exists():
            out.unlink()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        tmp = _own_temp(proc, out.parent)
        assert tmp is not None, f"trial {i}: the run ended without writing a temp file"
        delay = 0.8 * window * (i + 0.5) / n
        time.sleep(delay)
        in_window = proc.poll() is None and not out.exists() and tmp.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for p, h in before.items():
            assert sha(p) == h, f"trial {i}: input {p} changed"
        if out.exists():
            check(out)
            outcomes["complete"] += 1
            window = min(window, 0.8 * delay)
        else:
            assert tmp.exists(), f"trial {i}: killed mid-write but its temp file is gone"
            outcomes["absent"] += 1
        outcomes["in_window"] += in_window
    return outcomes


@pytest.mark.parametrize("fmt", ["h5", "keras"])
def test_sigkill_during_apply(tower, tmp_path, fmt):
    ext = ".weights.h5" if fmt == "h5" else ".keras"
    ref = tmp_path / f"ref{ext}"
    window = _write_window(_apply_args(tower, fmt, ref), ref)
    model = tower / "tower.keras" if fmt == "h5" else None
    expected = read_all(ref, model)
    assert len(expected) >= 140

    def check(path):
        got = read_all(path, model)
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"edited{ext}"
    inputs = [tower / "tower.keras"] + ([tower / "tower.weights.h5"] if fmt == "h5" else [])
    outcomes = _kill_trials(_apply_args(tower, fmt, out), out, inputs, TRIALS[fmt], window, check)
    # the kills did land inside the write/rename window (a run may be faster than the reference)
    assert outcomes["in_window"] >= 0.6 * TRIALS[fmt], (window, outcomes)
    # the next successful run leaves no temp file, its own or the killed runs'
    if out.exists():
        out.unlink()
    _reference(_apply_args(tower, fmt, out), out)
    check(out)
    assert temps(out_dir) == []


def test_stale_temps_of_other_targets_and_live_processes_are_kept(tmp_path):
    """Cleanup only removes the same target's temps whose process is gone."""
    from surgeon.core import atomic
    target = tmp_path / "a.keras"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = atomic._host()
    stale = tmp_path / f".a.keras.{host}-{dead}.abcd1234.surgeon-tmp"
    live = tmp_path / f".a.keras.{host}-{os.getppid()}.abcd1234.surgeon-tmp"
    other = tmp_path / f".b.keras.{host}-{dead}.abcd1234.surgeon-tmp"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    tmp = atomic.temp_path(target)
    assert tmp.name.startswith(f".a.keras.{host}-{os.getpid()}.") and tmp.name.endswith(".surgeon-tmp")
    tmp.write_bytes(b"new")
    atomic.commit(tmp, target)
    assert target.read_bytes() == b"new"
    assert not stale.exists() and live.exists() and other.exists()


# -- convert (Keras/TF in the subprocess: slow, so few trials) ------------------------------
SLOW = os.environ.get("SURGEON_SLOW_TESTS") == "1"


@pytest.mark.parametrize("ext", [
    ".ckpt",
    pytest.param(".h5", marks=pytest.mark.skipif(not SLOW, reason="slow; SURGEON_SLOW_TESTS=1")),
])
def test_sigkill_during_convert(tower, tmp_path, ext):
    """``surgeon convert`` to a TF checkpoint (bundle) or legacy H5, killed while writing.

    Importing TensorFlow takes most of a run, so each kill waits until the run has created
    its temp file in the output directory, then lands 0-0.6 s into the write."""
    src = tower / "tower.keras"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"conv{ext}"
    probe = out if ext == ".h5" else Path(str(out) + ".index")
    cmd = [*SURGEON, "convert", str(src), str(out)]
    before, survivors = sha(src), []
    for i, delay in enumerate((0.0, 0.25, 0.6)):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        deadline = time.monotonic() + 120
        while not temps(out_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert sha(src) == before
        if probe.exists():  # finished before the kill: keep it to compare
            keep = tmp_path / f"survivor{i}"
            keep.mkdir()
            for p in out_dir.glob("conv*"):
                shutil.move(str(p), keep / p.name)
            survivors.append(keep / out.name)
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    expected = read_all(out)
    assert len(expected) >= 140
    for path in survivors:
        got = read_all(path)
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert temps(out_dir) == []


# -- disk full, read-only output, output == input -----------------------------------------
def _mount_tmpfs(path, opts):
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                       capture_output=True, text=True)
    return r.returncode == 0


def _umount(path):
    subprocess.run(["umount", str(path)], capture_output=True)


def _one_line_error(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("surgeon: error: "), r.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("fmt", ["h5", "keras"])
def test_disk_full(tower, tmp_path, fmt):
    """A 4 MB filesystem for a 16 MB output (or RLIMIT_FSIZE if tmpfs cannot be mounted)."""
    ext = ".weights.h5" if fmt == "h5" else ".keras"
    small = tmp_path / "small"
    mounted = _mount_tmpfs(small, "size=4m")
    preexec = None
    if not mounted:
        import resource
        small.mkdir(exist_ok=True)

        def preexec():
            resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
    try:
        before = sha(tower / "tower.keras")
        out = small / f"out{ext}"
        r = subprocess.run(_apply_args(tower, fmt, out), capture_output=True, text=True,
                           env=ENV, preexec_fn=preexec)
        line = _one_line_error(r)
        assert "No space left on device" in line or "File too large" in line, line
        assert not out.exists()
        assert temps(small) == []
        assert sha(tower / "tower.keras") == before
    finally:
        if mounted:
            _umount(small)


def test_read_only_output_directory(tower, tmp_path):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=1m"):
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs and root ignores directory permissions")
        ro.mkdir(exist_ok=True)
        ro.chmod(0o555)
    try:
        for fmt, ext in (("keras", ".keras"), ("h5", ".weights.h5")):
            r = subprocess.run(_apply_args(tower, fmt, ro / f"out{ext}"), capture_output=True,
                               text=True, env=ENV)
            line = _one_line_error(r)
            assert "Read-only file system" in line or "Permission denied" in line, line
            assert os.listdir(ro) == []
    finally:
        _umount(ro)


def test_output_equal_to_input_is_refused(tower, tmp_path):
    src = tmp_path / "model.keras"
    shutil.copy(tower / "tower.keras", src)
    alias = tmp_path / "alias.keras"
    alias.symlink_to(src)
    before = sha(src)
    for out in (src, alias):
        r = subprocess.run([*SURGEON, "apply", str(tower / "recipe.toml"), "-i", str(src), "-o",
                            str(out), "--no-progress"], capture_output=True, text=True, env=ENV)
        line = _one_line_error(r)
        assert "output is the input" in line, line
        assert sha(src) == before
    assert temps(tmp_path) == []


def test_library_apply_raises_write_error_on_full_disk(tower, tmp_path):
    import dataclasses
    from surgeon.core.errors import WriteError
    from surgeon.recipe.execute import apply
    from surgeon.recipe.loader import load_recipe
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "size=4m"):
        pytest.skip("cannot mount a tmpfs")
    try:
        rec = load_recipe(tower / "recipe.toml")
        rec = dataclasses.replace(rec, input=str(tower / "tower.keras"),
                                  output=str(small / "out.keras"))
        with pytest.raises(WriteError):
            apply(rec, hash_inputs=False)
        assert temps(small) == []
    finally:
        _umount(small)
