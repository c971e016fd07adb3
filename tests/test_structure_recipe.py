"""Structural ops (widen, deepen, ...) inside recipes: they run first, then the tensor ops."""
import subprocess
import sys

import numpy as np

from conftest import FIXTURES, ROOT, load_keras_model
from surgeon import open_checkpoint

MLP = FIXTURES / "structure" / "mlp_adam.keras"


def _apply(recipe, *args):
    return subprocess.run([sys.executable, "-m", "surgeon", "apply", str(recipe), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_widen_then_rescale_in_one_recipe(tmp_path):
    out = tmp_path / "wide.keras"
    r = tmp_path / "r.py"
    r.write_text("from surgeon.recipe import recipe, widen, rescale\n"
                 f"RECIPE = recipe(input={str(MLP)!r}, output={str(out)!r}, ops=[\n"
                 "    widen(layer='fc1', to=12),\n"
                 "    rescale('out/kernel', factor=0.5, slots='follow'),\n])\n")
    dry = _apply(r, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "widen(layer=fc1, to=12" in dry.stdout and f"[{r}:3]" in dry.stdout
    assert not out.exists()
    p = _apply(r)
    assert p.returncode == 0, p.stderr
    # Reference: the structural op alone through the library, then the rescale by numpy.
    from surgeon import structure
    ref = tmp_path / "ref.keras"
    structure.execute(structure.plan_widen(str(MLP), "fc1", to=12), ref)
    with open_checkpoint(out) as a, open_checkpoint(ref) as b:
        assert a.entry("fc1/kernel").shape[-1] == 12
        for e in b.entries():
            want = b.read(e.name)
            if e.name == "out/kernel":
                want = want * np.float32(0.5)
            elif e.name == "optimizer/out/kernel/momentum":
                want = want * np.float32(0.5)
            elif e.name == "optimizer/out/kernel/velocity":
                want = want * np.float32(0.25)
            np.testing.assert_array_equal(a.read(e.name), want, err_msg=e.name)
    model = load_keras_model(out)
    assert int(model.optimizer.iterations) == 3
    log = subprocess.run([sys.executable, "-m", "surgeon", "log", str(out)], capture_output=True,
                         text=True, cwd=ROOT)
    assert f"inputs: {MLP}" in log.stdout and "widen(layer=fc1, to=12" in log.stdout


def test_toml_deepen_preserves_the_function(tmp_path):
    out = tmp_path / "deep.keras"
    r = tmp_path / "r.toml"
    r.write_text(f"input = {str(MLP)!r}\noutput = {str(out)!r}\n\n[[ops]]\nop = \"deepen\"\nafter = \"fc1\"\n")
    p = _apply(r)
    assert p.returncode == 0, p.stderr
    a, b = load_keras_model(MLP), load_keras_model(out)
    assert len(b.layers) == len(a.layers) + 1
    x = np.random.RandomState(0).rand(5, a.input_shape[-1]).astype("float32")
    np.testing.assert_allclose(b.predict(x, verbose=0), a.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_structural_op_after_a_tensor_op_is_a_plan_error(tmp_path):
    out = tmp_path / "o.keras"
    r = tmp_path / "bad.py"
    r.write_text("from surgeon.recipe import recipe, widen, zero\n"
                 f"RECIPE = recipe(input={str(MLP)!r}, output={str(out)!r}, ops=[\n"
                 "    zero('out/bias'),\n"
                 "    widen(layer='fc1', to=12),\n])\n")
    p = _apply(r)
    assert p.returncode == 2
    assert p.stderr == (f"surgeon: error: {r}:4: op 'widen': structural ops must come before tensor "
                        "ops in a recipe (they rewrite the whole model)\n")
    assert not out.exists()


def test_structural_op_with_unknown_parameter_fails_at_load(tmp_path):
    r = tmp_path / "bad.py"
    r.write_text("from surgeon.recipe import recipe, widen\n"
                 f"RECIPE = recipe(input={str(MLP)!r}, output='x.keras', ops=[widen(layer='fc1', to=12, width=3)])\n")
    p = _apply(r)
    assert p.returncode == 2
    assert p.stderr.startswith(f"surgeon: error: {r}:2: op 'widen': ")
    assert "width" in p.stderr and len(p.stderr.splitlines()) == 1
