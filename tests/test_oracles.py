"""Positive controls and claims checked against their oracle (Keras itself, file hashes).

- the warnings-as-errors loader (``conftest.load_keras_model``) fails on a broken file;
- every audit finding that says "Keras skips the whole optimizer" is what Keras does, and
  every other fixture's optimizer state is loaded by Keras;
- a legacy .h5 whose Lambda layer carries live bytecode (it writes a marker file when
  run) is never executed by ``ls``/``convert``/``resume``;
- every writing command leaves its inputs byte-identical on a *successful* run.
"""
import hashlib
import json
import shutil
import warnings

import h5py
import numpy as np
import pytest

from conftest import FIXTURES, fixture, load_keras_model, run_cli

AUDIT = FIXTURES / "audit"
LEGACY = FIXTURES / "legacy"


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the warnings oracle has teeth -------------------------------------------------------------
@pytest.mark.parametrize("path,weights_of", [
    ("audit/slot_missing.weights.h5", "cnn_adam.keras"),  # Keras: "Skipping variable loading"
    ("audit/slot_on_frozen.keras", None),
])
def test_warnings_oracle_fails_on_a_broken_file(path, weights_of):
    """Positive control: the loader every other test trusts refuses what Keras only warns about."""
    w = fixture(weights_of) if weights_of else None
    # Keras re-raises the warning (now an error) as "objects could not be loaded"
    with pytest.raises((UserWarning, ValueError), match="Skipping variable loading for optimizer"):
        load_keras_model(fixture(path), weights_of=w)
    load_keras_model(fixture("cnn_adam.weights.h5") if w else fixture("cnn_adam.keras"), weights_of=w)


# -- audit's "Keras skips the whole optimizer" against Keras ---------------------------------
AUDIT_FILES = sorted(p.name for p in AUDIT.iterdir() if p.suffix in (".keras", ".h5"))


def _keras_optimizer_outcome(path):
    """(iterations Keras restored, warnings, error) loading ``path`` the way a user would."""
    import keras
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if path.name.endswith(".weights.h5"):
                model = keras.saving.load_model(fixture("cnn_adam.keras"))
                for v in model.optimizer.variables:  # so that a skipped load shows as 0
                    v.assign(np.zeros(v.shape, v.dtype))
                model.load_weights(path)
            else:
                model = keras.saving.load_model(path)
            return int(model.optimizer.iterations.numpy()), [str(w.message) for w in caught], None
        except Exception as exc:  # noqa: BLE001 - Keras refusing is one of the outcomes
            return None, [str(w.message) for w in caught], exc


@pytest.mark.parametrize("name", AUDIT_FILES)
def test_audit_skip_claims_match_keras(name):
    from surgeon import open_checkpoint
    from surgeon.inspect.audit import audit_path
    path = AUDIT / name
    model = fixture("cnn_adam.keras") if name.endswith(".weights.h5") else None
    claims = [f for f in audit_path(path, model=model).findings if "Keras skips" in f.message]
    with open_checkpoint(path, model=model) as ck:
        stored = (ck.metadata()["optimizer"] or {}).get("iterations")
    iterations, caught, error = _keras_optimizer_outcome(path)
    skipped = error is not None or any("Skipping variable loading for optimizer" in m for m in caught)
    if claims:
        assert skipped and iterations != stored, (claims, iterations, caught)
        assert all(f.severity == "error" for f in claims)
    elif stored is not None:  # the optimizer is there and Keras takes it
        assert not skipped and iterations == stored > 0, (iterations, caught, error)


# -- a live Lambda payload in a legacy .h5 never runs ----------------------------------------
def _payload_source(marker):
    return f"def payload(x):\n    open({str(marker)!r}, 'w').write('ran')\n    return x\n"


def _lambda_h5(path, marker):
    """k20_mlp_adam.h5 with a Lambda layer appended whose marshalled code writes ``marker``."""
    from keras.src.utils.python_utils import func_dump
    ns = {}
    exec(_payload_source(marker), ns)  # noqa: S102 - the payload under test
    code, _, _ = func_dump(ns["payload"])
    shutil.copy(LEGACY / "k20_mlp_adam.h5", path)
    with h5py.File(path, "a") as f:
        cfg = json.loads(f.attrs["model_config"])
        layers = cfg["config"]["layers"]
        last = cfg["config"]["output_layers"][0][0]
        layers.append({"class_name": "Lambda", "name": "lam", "config": {
            "name": "lam", "trainable": True, "function": [code, None, None],
            "function_type": "lambda", "output_shape": None, "output_shape_type": "raw",
            "arguments": {}}, "inbound_nodes": [[[last, 0, 0, {}]]]})
        cfg["config"]["output_layers"] = [["lam", 0, 0]]
        f.attrs["model_config"] = json.dumps(cfg)
        mw = f["model_weights"]
        mw.create_group("lam").attrs["weight_names"] = np.array([], dtype="S1")
        mw.attrs["layer_names"] = np.array(list(mw.attrs["layer_names"]) + [b"lam"])


def test_lambda_payload_is_live(tmp_path):
    """Positive control: the fixture's bytecode, loaded the way Keras does, writes the marker."""
    from keras.src.utils.python_utils import func_load
    marker = tmp_path / "ran"
    _lambda_h5(tmp_path / "lam.h5", marker)
    with h5py.File(tmp_path / "lam.h5") as f:
        cfg = json.loads(f.attrs["model_config"])
    lam = next(layer for layer in cfg["config"]["layers"] if layer["name"] == "lam")
    assert func_load(lam["config"]["function"])(3) == 3
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("command", ["ls", "convert", "convert-weights", "resume", "resume-config"])
def test_lambda_payload_never_runs(tmp_path, command, monkeypatch):
    marker = tmp_path / "ran"
    src = tmp_path / "lam.h5"
    _lambda_h5(src, marker)
    with h5py.File(src) as f:
        (tmp_path / "config.json").write_text(f.attrs["model_config"])
    before = sha(src)
    monkeypatch.chdir(FIXTURES.parent)  # recipes/example_data.py
    resume = ["resume", src, "--data", "recipes/example_data.py:cnn_data", "--steps", "1",
              "-o", tmp_path / "out.keras"]
    args = {"ls": ["ls", src],
            "convert": ["convert", src, tmp_path / "out.keras"],
            "convert-weights": ["convert", src, tmp_path / "out.weights.h5"],
            "resume": resume,
            "resume-config": resume + ["--model", tmp_path / "config.json"]}[command]
    res = run_cli(*args)
    assert not marker.exists(), f"{command} executed the Lambda's bytecode"
    assert sha(src) == before
    if command == "ls":
        assert res.exit_code == 0, res.output
        return
    assert res.exit_code == 2 and res.output.startswith("surgeon: error: "), res.output
    if command.startswith("convert"):
        assert "Lambda layer (lam)" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "lam.h5"]


# -- successful runs leave every input byte-identical ---------------------------------------
RECIPE = """
[[ops]]
op = "rescale"
select = "*/kernel"
factor = 0.5
slots = "follow"
"""
WRITING = {
    "apply-keras": (["cnn_adam.keras"], lambda i, o: ["apply", "R", "-i", i[0], "-o", o / "x.keras"]),
    "apply-weights-h5": (["cnn_adam.weights.h5", "cnn_adam.keras"],
                         lambda i, o: ["apply", "R", "-i", i[0], "--model", i[1], "-o", o / "x.weights.h5"]),
    "apply-sharded": (["cnn_adam_sharded.weights.json"] + [f"cnn_adam_sharded_{k:05d}.weights.h5" for k in range(5)]
                      + ["cnn_adam.keras"],
                      lambda i, o: ["apply", "R", "-i", i[0], "--model", i[-1], "-o", o / "x.weights.json"]),
    "apply-legacy": (["legacy/tfk_cnn_adam.h5"], lambda i, o: ["apply", "R", "-i", i[0], "-o", o / "x.h5"]),
    "convert-to-legacy": (["nested_adamw.keras"], lambda i, o: ["convert", i[0], o / "x.h5"]),
    "convert-from-legacy": (["legacy/k20_mlp_adam.h5"], lambda i, o: ["convert", i[0], o / "x.keras"]),
    "convert-to-tf": (["cnn_adam.keras"], lambda i, o: ["convert", i[0], o / "x.ckpt"]),
    "transplant": (["cnn_adam.keras", "recipe/cnn5_fresh.keras"],
                   lambda i, o: ["transplant", i[0], i[1], "-o", o / "x.keras", "--layers", "conv1"]),
    "widen": (["structure/mlp_adam.keras"], lambda i, o: ["widen", i[0], "--layer", "fc1", "--to", "16",
                                                          "-o", o / "x.keras"]),
    "delete-channels": (["structure/residual_rms.keras"],
                        lambda i, o: ["delete-channels", i[0], "--layer", "c2", "--channels", "0,3",
                                      "-o", o / "x.keras"]),
    "resume": (["cnn_adam.keras"], lambda i, o: ["resume", i[0], "--data", "recipes/example_data.py:cnn_data",
                                                 "--steps", "1", "-o", o / "x.keras"]),
}


@pytest.mark.parametrize("command", list(WRITING))
def test_successful_write_leaves_inputs_untouched(tmp_path, command, monkeypatch):
    names, argv = WRITING[command]
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    inputs = []
    for n in names:
        inputs.append(src / n.replace("/", "_") if "sharded" not in n else src / n)
        shutil.copy(fixture(n), inputs[-1])
    (src / "r.toml").write_text(RECIPE)
    monkeypatch.chdir(FIXTURES.parent)  # recipes/example_data.py
    before = {p: sha(p) for p in src.iterdir()}
    args = [str(src / "r.toml") if a == "R" else a for a in argv(inputs, out)]
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    assert list(out.iterdir()), "nothing written"
    assert {p: sha(p) for p in src.iterdir()} == before, f"{command} modified an input"
