"""Conformance: the zoo (tests/modern_zoo.py) x every format Keras writes for each model,
with Keras itself as the oracle.

Formats: ``.keras``, ``.weights.h5``, sharded ``.weights.json``, legacy ``.h5`` (where
Keras writes one), TF checkpoint, SavedModel. For every model: ``ls`` names and roles
equal Keras' (``trainable_variables``, the layers' own variable lists, the optimizer's
variables); ``diff`` between any two formats is "equal"; an identity ``apply`` is
loaded back by Keras unchanged; ``convert`` to ``.keras`` is loaded by Keras with the
trained values; every cell surgeon cannot do is a one-line refusal (exit 2, nothing
written).
"""
import itertools
import json
import warnings

import numpy as np
import pytest

from conftest import FIXTURES, load_keras_model, run_cli
from surgeon.formats import open_checkpoint

import modern_zoo

# A plain Functional model in every format: tests/test_roundtrip.py, test_tf_bundle.py
MODELS = ["sequential", "nested", "subclassed"]
FORMATS = ["keras", "weights", "sharded", "legacy", "ckpt", "saved"]


@pytest.fixture(scope="session")
def forms(zoo):
    """forms(model) -> (Keras model, {format: path}) with every format Keras writes."""
    cache = {}

    def get(name):
        if name not in cache:
            model, d = zoo(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                more = modern_zoo.save_more(model, d, name)
            paths = {"keras": d / f"{name}.keras", "weights": d / f"{name}.weights.h5",
                     "ckpt": d / f"{name}_ckpt"} | more
            cache[name] = (model, {f: p for f, p in paths.items() if p is not None})
        return cache[name]
    return get


def _cell(forms, name, fmt):
    model, paths = forms(name)
    if fmt not in paths:
        pytest.skip(f"Keras writes no {fmt} for {name}")  # checked in test_unsupported
    return model, paths, paths[fmt]


def _model_arg(paths, fmt):
    return None if fmt == "keras" else paths["keras"]


def _role(e):
    return "frozen" if e.frozen else e.role


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_ls_names_roles_and_values_match_keras(forms, name, fmt):
    model, paths, path = _cell(forms, name, fmt)
    roles, values, slots = modern_zoo.keras_truth(model)
    with open_checkpoint(path, model=_model_arg(paths, fmt)) as ck:
        got = {e.name: _role(e) for e in ck.entries() if e.role in ("param", "state")}
        assert got == roles
        assert {e.name for e in ck.entries() if e.role == "slot"} == set(slots)
        for n, value in (values | slots).items():
            np.testing.assert_array_equal(ck.read(n), value, err_msg=n)
        assert ck.metadata()["optimizer"]["iterations"] == int(model.optimizer.iterations)


@pytest.mark.parametrize("fmt", ["ckpt", "saved"])
@pytest.mark.parametrize("name", MODELS)
def test_tf_formats_alone_name_like_keras_or_say_why_not(forms, name, fmt):
    """Without a config beside it, a TF checkpoint/SavedModel names every variable as
    .keras does, or a note says which names it cannot know (nested models)."""
    model, _, path = _cell(forms, name, fmt)
    roles, _, _ = modern_zoo.keras_truth(model)
    with open_checkpoint(path) as ck:
        names = {e.name for e in ck.entries() if e.role in ("param", "state")}
        notes = ck.metadata()["notes"]
    if names != set(roles):
        assert any("nested model" in n and "--model" in n for n in notes), (names, notes)


@pytest.mark.parametrize("name", MODELS)
def test_diff_between_any_two_formats_is_equal(forms, name):
    """Every format against the .keras, and the two TF formats against each other. With
    --model every reader's names come from the same config, not from its partner, so
    equality with the .keras file is equality between any two formats."""
    _, paths = forms(name)
    pairs = [("keras", f) for f in sorted(paths) if f != "keras"] + [("ckpt", "saved")]
    for a, b in pairs:
        res = run_cli("diff", paths[a], paths[b], "--json", "--model", paths["keras"])
        out = json.loads(res.output)
        assert res.exit_code == 0 and out["equal"] is True, (a, b, out["summary"], out["notes"])


def _identity_recipe(tmp_path, src, out):
    recipe = tmp_path / "identity.toml"
    recipe.write_text(f'input = "{src}"\noutput = "{out}"\n[[ops]]\nop = "rescale"\n'
                      'select = { pattern = "*", role = "param" }\nfactor = 1.0\n')
    return recipe


@pytest.mark.parametrize("name,fmt,suffix", [("nested", "keras", ".keras"),
                                             ("subclassed", "weights", ".weights.h5"),
                                             ("subclassed", "ckpt", "")])
def test_identity_apply_is_loaded_back_unchanged(forms, tmp_path, name, fmt, suffix):
    model, paths, path = _cell(forms, name, fmt)
    out = tmp_path / f"out{suffix}" if suffix else tmp_path / "out_ckpt"
    args = ["--model", paths["keras"]] if fmt != "keras" else []
    res = run_cli("apply", _identity_recipe(tmp_path, path, out), *args)
    assert res.exit_code == 0, res.output
    _, values, _ = modern_zoo.keras_truth(model)
    if fmt == "keras":
        loaded = load_keras_model(out)
        names = modern_zoo.keras_names(loaded)
        got = {names[id(v)]: np.asarray(v) for v in loaded.variables}
    elif fmt == "weights":
        loaded = load_keras_model(out, weights_of=paths["keras"])
        names = modern_zoo.keras_names(loaded)
        got = {names[id(v)]: np.asarray(v) for v in loaded.variables}
    else:
        res = run_cli("diff", path, out, "--json", "--model", paths["keras"])
        assert json.loads(res.output)["equal"] is True
        return
    assert set(got) == set(values)
    for n, v in values.items():
        np.testing.assert_array_equal(got[n], v, err_msg=n)


@pytest.mark.parametrize("name,fmt", [("nested", "legacy"), ("nested", "ckpt"),
                                      ("nested", "saved"), ("subclassed", "weights"),
                                      ("subclassed", "ckpt")])
def test_convert_to_keras_is_loaded_by_keras(forms, tmp_path, name, fmt):
    """A nested model's TF checkpoint/SavedModel (no config, no nested model names) is
    converted with --like MODEL.keras: every tensor still pairs by name."""
    model, paths, path = _cell(forms, name, fmt)
    out = tmp_path / "out.keras"
    args = ["--model", paths["keras"]] if fmt != "legacy" else []
    if name == "nested" and fmt in ("ckpt", "saved"):
        args = ["--like", paths["keras"]]
    if name == "nested" and fmt == "legacy":
        # Keras 3 cannot rebuild its own legacy .h5 of a nested model (load_model fails
        # too): refused in one line; the model's .keras gives the structure instead
        assert _refused(run_cli("convert", path, out), out)
        args = ["--like", paths["keras"]]
    res = run_cli("convert", path, out, "--json", *args)
    assert res.exit_code == 0, res.output
    assert {p["how"] for p in json.loads(res.output)["pairs"]} <= {"name", "slot", "global"}
    loaded = load_keras_model(out)
    roles, values, slots = modern_zoo.keras_truth(loaded)
    want_roles, want_values, want_slots = modern_zoo.keras_truth(model)
    assert roles == want_roles and set(slots) == set(want_slots)
    for n, v in (want_values | want_slots).items():
        np.testing.assert_array_equal((values | slots)[n], v, err_msg=n)


def _refused(res, out):
    lines = res.output.strip().splitlines()
    return res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("surgeon: error: ") \
        and not out.exists()


def test_unsupported_cells_are_one_line_refusals(forms, tmp_path):
    """Keras writes no legacy .h5 for a subclassed model: converting to one is refused;
    a TF checkpoint holds no config: converting it needs --model/--like; a nested model's
    TF checkpoint named by a model that does not fit is refused, never paired by order."""
    _, sub = forms("subclassed")
    assert "legacy" not in sub
    out = tmp_path / "sub.h5"
    assert _refused(run_cli("convert", sub["keras"], out), out)
    _, nested = forms("nested")
    out = tmp_path / "n.keras"
    assert _refused(run_cli("convert", nested["ckpt"], out), out)
    res = run_cli("convert", nested["ckpt"], out, "--like", FIXTURES / "cnn_adam.keras")
    assert _refused(res, out) and "by name only" in res.output, res.output


def test_diff_says_why_names_differ(forms):
    """Names a format cannot know (a nested model's name in a TF checkpoint compared with
    bare weights, no config on either side) are never silently different: diff carries
    the reader's note."""
    _, paths = forms("nested")
    res = run_cli("diff", paths["ckpt"], paths["weights"], "--json")
    out = json.loads(res.output)
    assert res.exit_code == 1 and out["equal"] is False
    assert any(n.startswith("A: nested models") and "--model" in n for n in out["notes"])
    text = run_cli("diff", paths["ckpt"], paths["weights"]).output
    assert "note: A: nested models" in text


@pytest.mark.parametrize("fmt", ["ckpt", "saved"])
def test_tf_format_named_by_the_file_it_is_compared_with(forms, fmt):
    """No config beside a nested model's TF checkpoint/SavedModel: diffed against the
    model's legacy .h5 it takes the nested names from that file's config ("equal")."""
    model, paths = forms("nested")
    res = run_cli("diff", paths[fmt], paths["legacy"], "--json")
    assert json.loads(res.output)["equal"] is True, res.output[-400:]
