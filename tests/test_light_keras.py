"""Light Keras (issue 14, goals 3 and 5): a `surgeon` process that only builds, checks and
serialises configs (structural ops, convert to .keras / .weights.h5) loads Keras on its numpy
backend and never TensorFlow; the model is built without weight values. What it writes is
what the TensorFlow route writes: the same config.json, the same tensors, loaded by Keras
(TensorFlow) without warnings; its refusals are the same lines.

One fresh process runs every command (the light import is paid once); the references are
the same commands run here, in the test session, on TensorFlow-backed Keras (each when a
test first needs it)."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from conftest import FIXTURES, ROOT, load_keras_model, run_cli
from surgeon import open_checkpoint

STRUCT = FIXTURES / "structure"
LEGACY = FIXTURES / "legacy"

# name -> CLI arguments ({o} is the output path, {d} the output directory)
COMMANDS = {
    "widen_convbn": ["widen", STRUCT / "convbn_sgdm.keras", "--layer", "conv2", "--to", "9",
                     "-o", "{o}"],
    "deepen_residual": ["deepen", STRUCT / "residual_rms.keras", "--after", "add", "-o", "{o}"],
    "delete_heads_attn": ["delete-heads", STRUCT / "attn_adam.keras", "--layer", "mha",
                          "--heads", "1", "-o", "{o}"],
    "insert_dense_mlp": ["insert-layer", STRUCT / "mlp_adam.keras", "--after", "fc1", "--layer-json",
                         '{"class_name": "Dense", "config": {"units": 8}}', "--name", "extra",
                         "-o", "{o}"],
    "convert_k22_lstm": ["convert", LEGACY / "k22_lstm_adam.h5", "{o}"],
    "convert_tfk_cnn": ["convert", LEGACY / "tfk_cnn_legacy_adam.h5", "{o}"],
    "convert_tfk_weights": ["convert", LEGACY / "tfk_cnn_legacy_adam.h5", "{d}/tfk.weights.h5"],
    "convert_kept": ["convert", FIXTURES / "cnn_adam.keras", "{o}", "--like",
                     FIXTURES / "nested_adamw.keras", "--allow-missing"],
    "refuse_unknown_class": ["convert", "{d}/unknown_class.h5", "{o}"],
    "refuse_unknown_layer_json": ["insert-layer", STRUCT / "mlp_adam.keras", "--after", "fc1",
                                  "--layer-json", '{"class_name": "NoSuchLayer", "config": {}}',
                                  "-o", "{o}"],
}

RUNNER = """
import contextlib, io, json, sys
from surgeon.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv, prog_name="surgeon")
            code = 0
        except SystemExit as exc:
            code = exc.code
    results[name] = {"code": code, "stderr": err.getvalue()}
results["_modules"] = {m: m in sys.modules for m in ("tensorflow", "jax", "keras")}
import keras
results["_backend"] = keras.backend.backend()
print("RESULTS" + json.dumps(results))
"""


def _argv(name, where):
    out = _output(where, name)
    return [str(a).replace("{o}", str(out)).replace("{d}", str(where)) for a in COMMANDS[name]]


def _unknown_class_source(where):
    bad = where / "unknown_class.h5"
    shutil.copy(LEGACY / "k20_mlp_adam.h5", bad)
    with h5py.File(bad, "a") as f:
        cfg = json.loads(f.attrs["model_config"])
        cfg["config"]["layers"][1]["class_name"] = "FancyDense"
        f.attrs["model_config"] = json.dumps(cfg)


@pytest.fixture(scope="module")
def light(tmp_path_factory):
    """(output dir, results): every command once, in one fresh `surgeon` process."""
    where = tmp_path_factory.mktemp("light")
    _unknown_class_source(where)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("KERAS_BACKEND", None)
    argvs = {name: _argv(name, where) for name in COMMANDS}
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return where, json.loads(r.stdout.split("RESULTS", 1)[1])


@pytest.fixture(scope="module")
def tf_route(tmp_path_factory):
    """name -> (output dir, result): the command run here, on TensorFlow, when first asked."""
    where, done = tmp_path_factory.mktemp("tf"), {}
    _unknown_class_source(where)

    def run(name):
        if name not in done:
            res = run_cli(*_argv(name, where))
            done[name] = {"code": res.exit_code, "stderr": res.output if res.exit_code else ""}
        return where, done[name]
    return run


def test_a_user_backend_choice_is_kept(tmp_path):
    """KERAS_BACKEND=tensorflow in the user's environment: no light import (which hides
    packages TensorFlow needs, e.g. requests); the command runs on TensorFlow and succeeds."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "w.keras"
    r = subprocess.run([sys.executable, "-m", "surgeon", "widen", STRUCT / "convbn_sgdm.keras",
                        "--layer", "conv2", "--to", "9", "-o", out], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_keras_model(out).get_layer("conv2").kernel.shape[-1] == 9


def test_the_light_process_never_loads_tensorflow(light):
    light = light[1]
    assert light["_modules"] == {"tensorflow": False, "jax": False, "keras": True}
    assert light["_backend"] == "numpy"
    for name in COMMANDS:
        assert light[name]["code"] == (2 if name.startswith("refuse") else 0), (name, light[name])


@pytest.mark.parametrize("name", [n for n in COMMANDS if n.startswith("refuse")])
def test_refusals_are_the_same_line(light, tf_route, name):
    (light_dir, res), (tf_dir, ref) = (light[0], light[1][name]), tf_route(name)
    assert res["stderr"].startswith("surgeon: error: ") and res["stderr"].count("\n") == 1, res
    assert res["stderr"] == ref["stderr"].replace(str(tf_dir), str(light_dir))


def _config(path):
    def norm(d):  # object ids, and the optimizer name Keras uniquifies per process
        if isinstance(d, dict):
            return {k: norm(v) for k, v in d.items() if k != "shared_object_id"}
        return [norm(v) for v in d] if isinstance(d, list) else d
    cfg = norm(json.loads(zipfile.ZipFile(path).read("config.json")))
    opt = (cfg.get("compile_config") or {}).get("optimizer") or {}
    if isinstance(opt, dict) and "config" in opt:
        opt["config"]["name"] = opt["config"]["name"].rsplit("_", 1)[0] \
            if opt["config"]["name"].rsplit("_", 1)[-1].isdigit() else opt["config"]["name"]
    return cfg


def _kept(path, twin=None):
    """Target tensors written with Keras' initial value (random per backend), from the log."""
    from surgeon.formats.provenance import read_log
    summary = read_log(path)[-1]["summary"]
    return set(summary.get("kept", ())) | ({"extra/kernel"} if summary.get("new") else set())


@pytest.mark.parametrize("name", [n for n in COMMANDS if not n.startswith("refuse")])
def test_light_output_is_the_tensorflow_routes(light, tf_route, name):
    light_dir, (tf_dir, _) = light[0], tf_route(name)
    a, b = (_output(d, name) for d in (light_dir, tf_dir))
    twin = None
    if name.endswith("weights"):
        twin = tf_route("convert_tfk_cnn")[0] / "convert_tfk_cnn.keras"  # the model, TF route
        load_keras_model(a, weights_of=twin)
    else:
        assert _config(a) == _config(b)
        load_keras_model(a)  # Keras on TensorFlow, failing on any warning
    kept = _kept(b)
    with open_checkpoint(a, model=twin) as ca, open_checkpoint(b, model=twin) as cb:
        assert [e.name for e in ca.entries()] == [e.name for e in cb.entries()]
        for e in ca.entries():
            x, y = ca.read(e.name), cb.read(e.name)
            assert x.shape == y.shape and x.dtype == y.dtype, e.name
            if not np.array_equal(x, y):
                assert e.name in kept, f"{e.name} differs from the TensorFlow route's"
                assert np.std(x) > 0, f"{e.name}: Keras' initial value was not written"


def _output(d, name):
    return d / ("tfk.weights.h5" if name.endswith("weights") else f"{name}.keras")
