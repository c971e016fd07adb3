"""Subclassed models and custom layers: every variable has its Keras name (the layer names
from the model down, then the ``add_weight`` name) and its true role (param, frozen
param, state) in every format -- or a note says what the file cannot tell.

Keras itself is the oracle: the model's ``trainable_variables``, its layers' own variable
lists and its optimizer's variables (tests/modern_zoo.py ``subclassed``)."""
import json
import zipfile

import numpy as np
import pytest

from conftest import run_cli
from surgeon.formats import open_checkpoint


def _canon(model, v):
    """Keras' variable path without the top model's name (the README's name rule)."""
    top = model.name + "/"
    return v.path[len(top):] if v.path.startswith(top) else v.path


def keras_roles(model):
    """canonical name -> 'param' | 'frozen' | 'state', from Keras."""
    trainable = {id(v) for v in model.trainable_variables}
    created_trainable = {id(v) for layer in [model] + list(model._flatten_layers())
                         for v in layer._trainable_variables}
    return {_canon(model, v): "param" if id(v) in trainable else
            "frozen" if id(v) in created_trainable else "state" for v in model.variables}


def _role(e):
    return "frozen" if e.frozen else e.role


def _slots(model):
    """canonical slot name -> value, from the optimizer's variables (Keras names a slot
    ``<param path with _>_<slot>``)."""
    out = {}
    for v in model.optimizer.variables:
        for p in model.trainable_variables:
            stem = p.path.replace("/", "_") + "_"
            leaf = v.path.split("/")[-1]
            if leaf.startswith(stem):
                out[f"optimizer/{_canon(model, p)}/{leaf[len(stem):]}"] = np.asarray(v)
    return out


@pytest.mark.parametrize("fmt", ["keras", "weights", "ckpt"])
def test_names_roles_and_slots_match_keras(zoo, fmt):
    model, d = zoo("subclassed")
    path = {"keras": d / "subclassed.keras", "weights": d / "subclassed.weights.h5",
            "ckpt": d / "subclassed_ckpt"}[fmt]
    with open_checkpoint(path, model=None if fmt == "keras" else d / "subclassed.keras") as ck:
        got = {e.name: _role(e) for e in ck.entries() if e.role in ("param", "state")}
        assert got == keras_roles(model)
        for v in model.variables:
            np.testing.assert_array_equal(ck.read(_canon(model, v)), np.asarray(v))
        slots = _slots(model)
        assert {e.name for e in ck.entries() if e.role == "slot"} == set(slots)
        for name, value in slots.items():
            np.testing.assert_array_equal(ck.read(name), value)
        assert ck.metadata()["notes"] == []


def test_checkpoint_alone_names_like_keras_and_says_what_it_cannot_tell(zoo):
    """A TF checkpoint records neither layer names nor which untrained variables are
    state: names come from the graph (attributes) and add_weight names, and a note names
    the variables whose role it cannot know."""
    model, d = zoo("subclassed")
    roles = keras_roles(model)
    with open_checkpoint(d / "subclassed_ckpt") as ck:
        got = {e.name: _role(e) for e in ck.entries() if e.role in ("param", "state")}
        notes = ck.metadata()["notes"]
    assert set(got) == set(roles)
    assert {n for n, r in got.items() if r == "param"} == {n for n, r in roles.items()
                                                          if r == "param"}
    unsure = [n for n in roles if roles[n] == "state"]
    assert any("frozen weight or non-trainable state" in n and all(u in n for u in unsure)
               for n in notes), notes


def test_unavailable_class_is_labelled_not_guessed(zoo, tmp_path):
    """A .keras whose class is not registered here: positional names with a note saying
    the file records neither names nor trainability (never a silent 'param')."""
    _, d = zoo("subclassed")
    src = d / "subclassed.keras"
    dst = tmp_path / "unknown.keras"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "config.json":
                cfg = json.loads(data)
                cfg["registered_name"] = "nowhere>Sub"
                data = json.dumps(cfg).encode()
            zout.writestr(item, data)
    res = run_cli("ls", dst, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert any("records neither their variables' names nor which are trainable" in n
               for n in out["notes"]), out["notes"]


def test_resume_continues_like_fit(zoo, tmp_path):
    """`surgeon resume` of a subclassed model from the shell: the --data module registers
    the classes (as a user's module does) before the checkpoint is read, so the variables
    get Keras' names and the model's own add_weight slots bind; then it trains like fit."""
    import subprocess
    import sys

    import keras

    from conftest import ROOT
    _, d = zoo("subclassed")
    user = tmp_path / "user.py"
    user.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
                    "import modern_zoo\nmodern_zoo._classes()\n\n"
                    "def data():\n    return modern_zoo.X, modern_zoo.Y\n")
    out = tmp_path / "more.keras"
    r = subprocess.run([sys.executable, "-m", "surgeon", "resume", str(d / "subclassed.keras"),
                        "--data", f"{user}:data", "--steps", "2", "--batch-size", "8", "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import modern_zoo
    want = keras.saving.load_model(d / "subclassed.keras")
    want.fit(modern_zoo.X, modern_zoo.Y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    got = keras.saving.load_model(out)
    assert int(got.optimizer.iterations) == int(want.optimizer.iterations) == 4
    for a, b in zip(want.weights + want.optimizer.variables, got.weights + got.optimizer.variables):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7, err_msg=a.path)


def test_import_option_names_custom_classes_from_the_shell(zoo, tmp_path):
    """`surgeon --import user.py ls`: the module registers the classes before the file is
    read, so a fresh process lists a subclassed model with Keras' names and roles; without
    it, the names are positional and a note says so. A module that cannot be imported is
    one line, exit 2, and nothing is listed."""
    import subprocess
    import sys

    from conftest import ROOT
    model, d = zoo("subclassed")
    user = tmp_path / "user.py"
    user.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
                    "import modern_zoo\nmodern_zoo._classes()\n")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('no GPU here')\n")

    def ls(*pre):
        return subprocess.run([sys.executable, "-m", "surgeon", *pre, "ls",
                               str(d / "subclassed.keras"), "--json"],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)

    plain = ls()
    assert plain.returncode == 0, plain.stderr[-2000:]
    notes = json.loads(plain.stdout)["notes"]
    assert any("records neither their variables' names nor which are trainable" in n
               for n in notes), notes
    named = ls("--import", str(user))
    assert named.returncode == 0, named.stderr[-2000:]
    out = json.loads(named.stdout)
    assert out["notes"] == []
    got = {e["name"]: "frozen" if e["frozen"] else e["role"] for e in out["entries"]
           if e["role"] in ("param", "state")}
    assert got == keras_roles(model)
    assert {e["name"] for e in out["entries"] if e["role"] == "slot"} == set(_slots(model))
    for spec, words in ((str(bad), ("importing", "no GPU here")),
                        ("no_such_module_surgeon_test", ("cannot import",))):
        r = ls("--import", spec)
        assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("surgeon: error: "), r.stderr
        assert all(w in lines[0] for w in words) and "--import" in lines[0], lines[0]
