"""`surgeon ls` and the CLI's error contract: one line, exit 2, no traceback."""
import json
import subprocess
import sys

import pytest

from conftest import COMBOS, ROOT, fixture, run_cli


def test_ls_text_tree():
    r = run_cli("ls", fixture("cnn_adam.keras"))
    assert r.exit_code == 0
    out = r.output
    assert "conv1/\n  kernel" in out
    assert "frozen/\n  kernel" in out and "param frozen  slots: -" in out
    assert "slots: momentum,velocity" in out
    assert "optimizer: Adam (stored as adam), iterations=3" in out
    assert out.strip().splitlines()[-1].startswith("total: 12 weights, 327 values")


@pytest.mark.parametrize("combo", COMBOS)
def test_ls_json_contract(combo):
    r = run_cli("ls", "--json", fixture(f"{combo}.keras"))
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["format"] == "keras"
    assert set(d["optimizer"]) >= {"name", "iterations"} and d["optimizer"]["iterations"] == 3
    for e in d["entries"]:
        assert {"name", "shape", "dtype", "role", "slot_of", "slot"} <= set(e)
        assert e["role"] in ("param", "state", "slot", "optimizer")
        assert (e["slot_of"] is not None) == (e["role"] == "slot")


def test_ls_weights_with_model_binds_everything():
    r = run_cli("ls", "--json", fixture("cnn_rmsprop.weights.h5"), "--model", fixture("cnn_rmsprop.keras"))
    d = json.loads(r.output)
    assert not [e for e in d["entries"] if e["role"] == "slot" and not e["slot_of"]]
    assert d["notes"] == []


def _run(*args):
    return subprocess.run([sys.executable, "-m", "surgeon", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("name", ["cnn_adam.keras", "cnn_adam.weights.h5", "cnn_adam_sharded.weights.json"])
def test_ls_never_imports_tensorflow(name):
    code = ("import sys; from surgeon.cli import main\n"
            "try:\n    main([\"ls\", sys.argv[1]])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
            "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code, str(fixture(name))], capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "total:" in p.stdout


def test_error_unknown_format(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    p = _run("ls", f)
    assert p.returncode == 2
    assert p.stderr == (f"surgeon: error: {f}: unknown checkpoint format; supported: .keras (Keras 3 "
                        "model), .weights.h5 (Keras 3 weights), .weights.json (Keras 3 sharded weights), "
                        ".h5/.hdf5 (legacy Keras 2/tf.keras), TF checkpoints (prefix, directory or "
                        ".index), SavedModel directories, Orbax checkpoint directories (root, step "
                        "or item)\n")
    assert p.stdout == ""


def test_error_missing_file(tmp_path):
    p = _run("ls", tmp_path / "nope.keras")
    assert (p.returncode, p.stderr) == (2, f"surgeon: error: {tmp_path / 'nope.keras'}: no such file\n")


def test_error_truncated_keras(tmp_path):
    data = fixture("cnn_adam.keras").read_bytes()
    f = tmp_path / "trunc.keras"
    f.write_bytes(data[: len(data) // 2])
    p = _run("ls", f)
    assert p.returncode == 2
    assert p.stderr.startswith(f"surgeon: error: {f}: not a valid .keras archive (truncated or corrupt zip)")
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr


def test_error_truncated_weights_h5(tmp_path):
    data = fixture("cnn_adam.weights.h5").read_bytes()
    f = tmp_path / "trunc.weights.h5"
    f.write_bytes(data[: len(data) // 3])
    p = _run("ls", f)
    assert p.returncode == 2
    assert p.stderr.startswith(f"surgeon: error: {f}: not a readable HDF5 file (truncated or corrupt)")
    assert len(p.stderr.splitlines()) == 1


def test_error_corrupt_keras_member(tmp_path):
    import zipfile
    f = tmp_path / "bad.keras"
    with zipfile.ZipFile(fixture("cnn_adam.keras")) as src, zipfile.ZipFile(f, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data if info.filename != "model.weights.h5" else data[:100])
    p = _run("ls", f)
    assert p.returncode == 2
    assert p.stderr.startswith(f"surgeon: error: {f}!model.weights.h5: not a readable HDF5 file")


def test_error_model_for_keras_file():
    p = _run("ls", fixture("cnn_adam.keras"), "--model", fixture("cnn_adam.keras"))
    assert (p.returncode, p.stderr) == (
        2, "surgeon: error: --model is only for bare weights files; a .keras file has its own config\n")


def test_every_command_has_help_with_example():
    from surgeon.cli import main
    for name, cmd in main.commands.items():
        r = run_cli(name, "--help")
        assert r.exit_code == 0
        assert cmd.help and "Example" in cmd.help, f"command {name} lacks help with an example"


def test_python_dash_m():
    p = _run("--help")
    assert p.returncode == 0 and "surgeon ls" in p.stdout
