"""Hostile input: unsafe zips are refused; stored code and pickles are never executed.

Every payload here would create a marker file if it ran. The tests prove it did not, and
(for the Lambda layer) that the payload is live: Keras itself runs it when asked to.
"""
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from conftest import fixture

SURGEON = [sys.executable, "-m", "surgeon"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def run(*args, cwd=None):
    return subprocess.run([*SURGEON, *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd)


def _not_tf_noise(line):
    """TensorFlow's C++ logging (absl pre-init notes) is not surgeon's output."""
    return not (line.startswith("WARNING: All log messages before absl")
                or re.match(r"^[IWE]\d{4} \d\d:\d\d:\d\d", line))


def one_line_error(r):
    lines = [ln for ln in r.stderr.strip().splitlines() if _not_tf_noise(ln)]
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("surgeon: error: "), r.stderr[-2000:]
    return lines[0]


def rezip(src, dst, extra=()):
    """Copy a .keras archive member by member, then add ``extra`` (ZipInfo, bytes) members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        for info, data in extra:
            zout.writestr(info, data)
    return dst


# -- unsafe archives -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil.txt", "assets/../../evil.txt", "/etc/evil",
                                  "assets\\..\\evil.txt", "C:/evil.txt"])
def test_path_traversal_member_is_refused(tmp_path, name):
    bad = rezip(fixture("cnn_adam.keras"), tmp_path / "bad.keras",
                [(zipfile.ZipInfo(name), b"pwned")])
    line = one_line_error(run("ls", bad))
    assert "unsafe member name" in line, line
    assert not (tmp_path.parent / "evil.txt").exists()


def test_symlink_member_is_refused(tmp_path):
    link = zipfile.ZipInfo("assets/passwd")
    link.create_system = 3  # unix
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    bad = rezip(fixture("cnn_adam.keras"), tmp_path / "bad.keras", [(link, b"/etc/passwd")])
    line = one_line_error(run("ls", bad))
    assert "'assets/passwd' is a symbolic link" in line, line


def test_zip_bomb_member_is_refused(tmp_path):
    bomb = zipfile.ZipInfo("assets/bomb.bin")
    bomb.compress_type = zipfile.ZIP_DEFLATED
    bad = rezip(fixture("cnn_adam.keras"), tmp_path / "bad.keras", [(bomb, bytes(64 << 20))])
    assert bad.stat().st_size < 200_000  # 64 MB of zeros in ~100 kB
    line = one_line_error(run("ls", bad))
    assert "absurd compression ratio" in line, line


def test_lying_size_header_is_refused_or_bounded(tmp_path):
    """A deflated member whose header claims 10 bytes but inflates to 64 MB."""
    bomb = zipfile.ZipInfo("config.json")
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(fixture("cnn_adam.keras")) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if info.filename == "config.json":
                bomb.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(bomb, b" " * (64 << 20))
            else:
                zout.writestr(info, zin.read(info))
    # rewrite the central directory's uncompressed size of config.json to 10 bytes
    data = bytearray(bad.read_bytes())
    cd = data.find(b"PK\x01\x02")
    while cd != -1:
        n = int.from_bytes(data[cd + 28:cd + 30], "little")
        if data[cd + 46:cd + 46 + n] == b"config.json":
            data[cd + 24:cd + 28] = (10).to_bytes(4, "little")
        cd = data.find(b"PK\x01\x02", cd + 4)
    bad.write_bytes(bytes(data))
    one_line_error(run("ls", bad))


# -- code stored in a model config ---------------------------------------------------------
@pytest.fixture(scope="module")
def lambda_model(tmp_path_factory):
    """A real .keras whose config holds a Lambda layer's marshalled bytecode that, if run,
    creates ``marker``. Built in-process with Keras; the marker made while building is
    removed before the file is used."""
    import keras
    d = tmp_path_factory.mktemp("lambda")
    marker = d / "PAYLOAD_RAN"
    code = f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]"
    fn = eval(code)  # noqa: S307 - our own test payload
    inp = keras.Input((4,), name="x")
    h = keras.layers.Dense(3, name="dense")(inp)
    h = keras.layers.Lambda(fn, name="payload")(h)
    out = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inp, out, name="trojan")
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((4, 4), "float32")
    model.fit(x, np.ones((4, 2), "float32"), epochs=1, verbose=0)
    path = d / "trojan.keras"
    model.save(path)
    with zipfile.ZipFile(path) as z:
        config = z.read("config.json").decode()
    assert '"__lambda__"' in config and '"code"' in config  # marshalled bytecode stored
    marker.unlink()
    return path, marker


def test_lambda_payload_is_live_when_keras_loads_it_unsafely(lambda_model):
    """Positive control: the stored bytecode really runs under Keras' safe_mode=False."""
    path, marker = lambda_model
    r = subprocess.run([sys.executable, "-c",
                        "import sys, keras; keras.saving.load_model(sys.argv[1], safe_mode=False)",
                        str(path)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert marker.exists()
    marker.unlink()


def test_surgeon_reads_lambda_model_without_running_it(lambda_model, tmp_path):
    path, marker = lambda_model
    r = run("ls", path, "--json")
    assert r.returncode == 0, r.stderr
    assert '"dense/kernel"' in r.stdout and '"head/kernel"' in r.stdout
    assert not marker.exists()
    r = run("diff", path, path)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[ops]]\nop = "shrink_perturb"\nselect = { pattern = "head/*", '
                      'role = "param" }\nshrink = 0.5\nperturb = 0.0\nseed = 0\n')
    r = run("apply", recipe, "-i", path, "-o", tmp_path / "out.keras", "--no-progress")
    assert not marker.exists(), r.stderr
    assert r.returncode in (0, 2), r.stderr[-2000:]
    if r.returncode == 2:
        one_line_error(r)
    r = run("convert", path, tmp_path / "conv.keras")
    assert not marker.exists()
    line = one_line_error(r)  # convert refuses Lambda configs
    assert "Lambda" in line or "lambda" in line, line


# -- pickles in H5 -------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("src", ["cnn_adam.weights.h5", "legacy/k3_cnn_adam.h5"])
def test_pickled_objects_in_h5_are_never_unpickled(tmp_path, src):
    marker = tmp_path / "UNPICKLED"
    blob = pickle.dumps(_Payload(str(marker)))
    assert b"UNPICKLED" in blob
    path = tmp_path / ("evil.weights.h5" if src.endswith(".weights.h5") else "evil.h5")
    shutil.copy(fixture(src), path)
    with h5py.File(path, "r+") as f:
        group = next(g for g in f.values() if isinstance(g, h5py.Group))
        group.attrs["payload"] = np.void(blob)  # opaque bytes attr
        f.attrs["payload_bytes"] = np.frombuffer(blob, dtype="uint8")
        f.create_dataset("payload", data=np.void(blob))
        vl = f.create_dataset("payload_vlen", shape=(1,), dtype=h5py.vlen_dtype(np.uint8))
        vl[0] = np.frombuffer(blob, dtype="uint8")
    model = ["--model", fixture("cnn_adam.keras")] if src.endswith(".weights.h5") else []
    r = run("ls", path, *model, "--json")
    assert not marker.exists()
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("diff", path, path, *model)
    assert not marker.exists()
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("audit", path, *model)
    assert not marker.exists()
    import surgeon
    with surgeon.open_checkpoint(path, model=model[1] if model else None) as ck:
        for e in ck.entries():
            assert ck.read(e.name).dtype != object
    assert not marker.exists()


def test_object_dtype_dataset_is_refused_not_decoded(tmp_path):
    """A Keras weight replaced by a variable-length (object) dataset: a one-line error."""
    path = tmp_path / "obj.weights.h5"
    shutil.copy(fixture("cnn_adam.weights.h5"), path)
    with h5py.File(path, "r+") as f:
        del f["layers/dense/vars/0"]
        ds = f.create_dataset("layers/dense/vars/0", shape=(3,), dtype=h5py.vlen_dtype(np.uint8))
        ds[0] = np.frombuffer(b"x" * 10, dtype="uint8")
    import surgeon
    with surgeon.open_checkpoint(path) as ck:
        name = next(e.name for e in ck.entries() if e.key == "layers/dense/vars/0")
        with pytest.raises(surgeon.SurgeonError, match="unsupported tensor type"):
            ck.read(name)


# -- recipes are data ----------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    'op = "__import__(\'os\').system(\'touch {m}\')"\nselect = {{ pattern = "*" }}\n',
    'op = "shrink_perturb"\nselect = {{ pattern = "$(touch {m})" }}\nshrink = 0.5\n',
    'op = "shrink_perturb"\nselect = {{ pattern = "*", role = "param" }}\n'
    'shrink = "__import__(\'os\').system(\'touch {m}\')"\n',
])
def test_toml_recipe_strings_are_data(tmp_path, body):
    marker = tmp_path / "RECIPE_RAN"
    recipe = tmp_path / "evil.toml"
    recipe.write_text(f'input = "{fixture("cnn_adam.keras")}"\n'
                      f'output = "`touch {marker}`.keras"\n[[ops]]\n' + body.format(m=marker))
    r = run("apply", recipe, "--no-progress", cwd=tmp_path)
    assert not marker.exists()
    one_line_error(r)


def test_toml_recipe_output_name_that_looks_like_code_is_just_a_name(tmp_path):
    marker = tmp_path / "RECIPE_RAN"
    recipe = tmp_path / "ok.toml"
    out = f"$(touch {marker}).keras"
    recipe.write_text(f'input = "{fixture("cnn_adam.keras")}"\noutput = "{out}"\n[[ops]]\n'
                      'op = "shrink_perturb"\nselect = { pattern = "head/*", role = "param" }\n'
                      'shrink = 0.5\nperturb = 0.0\nseed = 0\n')
    r = run("apply", recipe, "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not marker.exists()
    assert (tmp_path / out).exists()
