"""Recipe loading, planning, CLI apply/transplant/log, provenance, ready recipes."""
import hashlib
import json
import textwrap

import numpy as np
import pytest

from conftest import ROOT, fixture, load_keras_model, run_cli
from recipe_helpers import keras_loads_and_trains, read_all
from surgeon.core.errors import RecipeError
from surgeon.recipe.execute import apply
from surgeon.formats.provenance import read_log
from surgeon.recipe import apply_overrides, load_recipe

CNN = fixture("cnn_adam.keras")


def write(tmp_path, body, name="r.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def recipe_py(tmp_path, ops, out="out.keras", extra=""):
    return write(tmp_path, f"""\
        from surgeon.recipe import *
        RECIPE = recipe(
            input={str(CNN)!r},
            output={str(tmp_path / out)!r},{extra}
            ops=[
                {ops}
            ],
        )
        """)


def test_loading_builds_a_frozen_declaration_with_lines(tmp_path):
    p = recipe_py(tmp_path, "zero('head/*'),\n        rescale('conv1/*', factor=2.0),")
    rec = load_recipe(p)
    assert [o.op for o in rec.ops] == ["zero", "rescale"]
    assert [o.where.line for o in rec.ops] == [6, 7]
    assert rec.ops[0].get("slots") == "reset" and rec.ops[1].get("slots") == "keep"
    assert not (tmp_path / "out.keras").exists()  # loading applies nothing
    with pytest.raises(Exception):
        rec.ops[0].op = "x"  # frozen


def test_toml_twin_plans_like_the_python_recipe():
    py = load_recipe(ROOT / "recipes/shrink_perturb.py")
    toml = load_recipe(ROOT / "recipes/shrink_perturb.toml")
    assert toml.ops[0].where.line == (ROOT / "recipes/shrink_perturb.toml").read_text().splitlines().index("[[ops]]") + 1
    a, _ = apply(py, dry_run=True)
    b, _ = apply(toml, dry_run=True)
    strip = lambda p: [{k: v for k, v in s.to_json().items() if k != "where"} for s in p.steps]  # noqa: E731
    assert strip(a) == strip(b) and a.iteration == b.iteration


def test_overrides(tmp_path):
    rec = load_recipe(ROOT / "recipes/reset_head.py")
    rec = apply_overrides(rec, output=str(tmp_path / "x.keras"),
                          sets=["ops.0.seed=7", "iteration=5", "ops.0.slots=warm"])
    assert rec.output == str(tmp_path / "x.keras") and rec.iteration == 5
    assert rec.ops[0].get("seed") == 7 and rec.ops[0].get("slots") == "warm"
    with pytest.raises(RecipeError, match="ops.3.seed: the recipe has 1 ops"):
        apply_overrides(rec, sets=["ops.3.seed=1"])
    with pytest.raises(RecipeError, match="slot policy 'follow' is not available"):
        apply_overrides(rec, sets=["ops.0.slots=follow"])


BAD = [
    ("op('frobnicate', 'head/*'),", "r.py:6: unknown op 'frobnicate'; ops: cast, clip"),
    ("frobnicate('head/*'),", "r.py:6: NameError: name 'frobnicate' is not defined"),
    ("zero('foo/*'),", "r.py:6: op 'zero': selector 'foo/*' matches nothing in"),
    ("zero('head/*'),\n        rescale('head/kernel', factor=2),",
     "r.py:7: op 'rescale': head/kernel is already written by op 'zero' (" ),
    (f"transfer({str(fixture('recipe/cnn5_fresh.keras'))!r}),",
     "r.py:6: op 'transfer': 2 shape mismatch(es), first: head/kernel 6x5 -> head/kernel 6x3; "
     "use on_mismatch='slice' (keeps the source's leading block)"),
    ("rename('head/kernel', to='top/kernel'),", "r.py:6: op 'rename': not possible for format 'keras'"),
    ("delete('head/*'),", "r.py:6: op 'delete': not possible for format 'keras'"),
    ("zero('head/*', slots='follow'),", "r.py:6: op 'zero': slot policy 'follow' is not available"),
    ("reinit('head/*', initializer='nope'),", "r.py:6: op 'reinit': unknown initializer 'nope'"),
    ("zero('head/*', sparsity=0.5),", "r.py:6: op 'zero': unknown parameter 'sparsity'"),
    ("mask('re:conv[', sparsity=0.5),", "r.py:6: op 'mask': bad regex 'conv['"),
    ("cast(select('*', role='optimizer'), dtype='bfloat16'),", "r.py:6: op 'cast': optimizer/iteration is int64"),
]


@pytest.mark.parametrize("ops,msg", BAD)
def test_bad_recipes_fail_at_plan_time(tmp_path, ops, msg):
    p = recipe_py(tmp_path, ops)
    res = run_cli("apply", p)
    assert res.exit_code == 2
    assert res.output.startswith("surgeon: error: ") and msg in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.keras").exists()
    assert not list(tmp_path.glob(".out.keras*"))


def test_again_composes_in_order(tmp_path):
    p = recipe_py(tmp_path, "rescale('head/kernel', factor=2.0),\n        rescale('head/kernel', factor=3.0, again=True),")
    res = run_cli("apply", p)
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(read_all(tmp_path / "out.keras")["head/kernel"],
                               read_all(CNN)["head/kernel"] * 6.0, rtol=1e-6)


def test_recipe_file_errors(tmp_path):
    p = write(tmp_path, "x = 1\nraise ValueError('boom')\n")
    res = run_cli("apply", p)
    assert res.exit_code == 2 and "r.py:2: ValueError: boom" in res.output
    p = write(tmp_path, "x = 1\n", name="none.py")
    assert "declare exactly one recipe" in run_cli("apply", p).output
    p = write(tmp_path, 'input = "a"\n[[ops]]\nop = "zero"\nselect = "x/*"\nbad = 1\n', name="t.toml")
    res = run_cli("apply", p)
    assert res.exit_code == 2 and "t.toml:2: op 'zero': unknown parameter 'bad'" in res.output
    p = write(tmp_path, '# c\n[[ops]]\nselect = "x"\n\n[[ops]]\nop = "nope"\n', name="u.toml")
    assert "u.toml:2: each [[ops]] needs op" in run_cli("apply", p).output
    p.write_text('[[ops]]\nop = "zero"\n\n[[ops]]\nop = "nope"\n')
    assert "u.toml:4: unknown op 'nope'" in run_cli("apply", p).output


def test_dry_run_equals_applied_plan(tmp_path):
    p = ROOT / "recipes/transfer_backbone.py"
    out = tmp_path / "tb.keras"
    dry = run_cli("apply", p, "-o", out, "--dry-run", "--json")
    assert dry.exit_code == 0 and not out.exists()
    done = run_cli("apply", p, "-o", out, "--json")
    assert done.exit_code == 0
    d, a = json.loads(dry.output), json.loads(done.output)
    assert d["plan"] == a["plan"] and d["dry_run"] and not a["dry_run"]
    assert a["written"]["tensors"] == len({s["target"] for s in a["plan"]["steps"]})
    # and the embedded provenance records that very plan
    assert read_log(out)[-1]["plan"] == a["plan"]


def test_plan_text_and_iteration_policies(tmp_path):
    p = ROOT / "recipes/reset_head.py"
    res = run_cli("apply", p, "--dry-run")
    assert res.exit_code == 0
    assert "reinit         head/kernel  6x3 float32" in res.output
    assert "slot momentum         reset" in res.output and "dry run: nothing written" in res.output
    for value, expect in (("reset", 0), ("42", 42)):
        out = tmp_path / f"it{expect}.keras"
        assert run_cli("apply", p, "-o", out, "--set", f"iteration={value}").exit_code == 0
        assert int(read_all(out)["optimizer/iteration"]) == expect
    keep = tmp_path / "keep.keras"
    run_cli("apply", p, "-o", keep)
    assert int(read_all(keep)["optimizer/iteration"]) == 3


def test_adam_bias_correction_warning(tmp_path):
    p = ROOT / "recipes/reset_head.py"
    res = run_cli("apply", p, "-o", tmp_path / "a.keras", "--set", "iteration=10000", "--dry-run")
    assert "surgeon: warning: 2 tensor(s) get zeroed Adam slots at iteration 10000" in res.output
    assert "~3.2x a normal step" in res.output and "slots='warm'" in res.output
    res = run_cli("apply", p, "-o", tmp_path / "a.keras", "--set", "iteration=10000",
                  "--set", "ops.0.slots=warm", "--dry-run")
    assert "warning" not in res.output


def test_provenance_chain_and_log(tmp_path):
    first, second = tmp_path / "a.keras", tmp_path / "b.keras"
    assert run_cli("apply", ROOT / "recipes/reset_head.py", "-o", first).exit_code == 0
    assert run_cli("apply", ROOT / "recipes/prune_magnitude.py", "-i", first, "-o", second).exit_code == 0
    log = read_log(second)
    assert len(log) == 2
    assert log[0]["recipe"]["path"].endswith("reset_head.py")
    text = (ROOT / "recipes/prune_magnitude.py").read_text()
    assert log[1]["recipe"]["text"] == text
    assert log[1]["recipe"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    from test_fast_io import expected_digest  # hashlib / the blake3 package, as recorded
    for rec, path in ((log[1], first), (log[0], CNN)):
        algorithm, digest = expected_digest(path)
        assert rec["inputs"][0][algorithm] == digest
    assert log[1]["plan"]["steps"][0]["op"] == "mask" and log[1]["version"]
    res = run_cli("log", second)
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert lines[0].startswith("#1 ") and "reset_head.py" in lines[0]
    assert "mask: 4 tensor(s)" in res.output
    assert json.loads(run_cli("log", second, "--json").output) == log
    assert "no surgery log" in run_cli("log", CNN).output
    load_keras_model(second)


def test_weights_h5_and_sharded_inputs(tmp_path):
    out = tmp_path / "o.weights.h5"
    res = run_cli("apply", ROOT / "recipes/reset_head.py", "-i", fixture("cnn_adam.weights.h5"),
                  "--model", CNN, "-o", out)
    assert res.exit_code == 0, res.output
    assert read_log(out)[0]["plan"]["format"] == "keras-weights-h5"
    load_keras_model(out, weights_of=CNN)
    sh = tmp_path / "o.weights.json"
    res = run_cli("apply", ROOT / "recipes/reset_head.py", "-i", fixture("cnn_adam_sharded.weights.json"),
                  "--model", CNN, "-o", sh)
    assert res.exit_code == 0, res.output
    assert len(read_log(sh)) == 1
    np.testing.assert_array_equal(read_all(sh, model=CNN)["head/kernel"], read_all(out, model=CNN)["head/kernel"])


def test_transplant_command(tmp_path):
    out = tmp_path / "t.keras"
    res = run_cli("transplant", fixture("nested_adamw.keras"), fixture("recipe/encoder_fresh.keras"),
                  "-o", out, "--layers", "backbone/*=encoder/*", "--iteration", "3")
    assert res.exit_code == 0, res.output
    src, n = read_all(fixture("nested_adamw.keras")), read_all(out)
    np.testing.assert_array_equal(n["optimizer/encoder/fc2/kernel/velocity"],
                                  src["optimizer/backbone/fc2/kernel/velocity"])
    assert int(n["optimizer/iteration"]) == 3
    res = run_cli("transplant", CNN, fixture("recipe/encoder_fresh.keras"), "-o", out, "--layers", "zzz/*")
    assert res.exit_code == 2 and "layers pattern 'zzz/*' matches nothing in" in res.output


def test_commands_have_help_with_examples():
    for cmd in ("apply", "transplant", "log"):
        res = run_cli(cmd, "--help")
        assert res.exit_code == 0 and "Example" in res.output


RECIPES = ["transfer_backbone.py", "reset_head.py", "shrink_perturb.py", "shrink_perturb.toml",
           "prune_magnitude.py", "to_bfloat16.py", "adapt_input_channels.py", "transplant_encoder.py"]


@pytest.mark.parametrize("name", RECIPES)
def test_ready_recipes_run_and_keras_loads(tmp_path, name):
    out = tmp_path / (name.replace(".", "_") + ".keras")
    res = run_cli("apply", ROOT / "recipes" / name, "-o", out)
    assert res.exit_code == 0, res.output
    if name in ("transfer_backbone.py", "prune_magnitude.py"):
        keras_loads_and_trains(out)
    else:
        load_keras_model(out)


def test_ready_recipes_declare_default_outputs_under_out():
    for name in RECIPES:
        rec = load_recipe(ROOT / "recipes" / name)
        assert rec.output.startswith("out/") and (ROOT / rec.input).exists(), name
        assert (ROOT / "recipes" / name).read_text().lstrip().startswith(('"""', "#"))


def test_named_sources_and_set_override(tmp_path):
    p = write(tmp_path, f"""\
        from surgeon.recipe import recipe, transfer
        RECIPE = recipe(
            input={str(fixture('recipe/cnn5_fresh.keras'))!r},
            output={str(tmp_path / 'o.keras')!r},
            sources={{"pretrained": "missing.keras"}},
            iteration="set 2",
            ops=[transfer("pretrained", "conv*/*")],
        )
        """)
    res = run_cli("apply", p)
    assert res.exit_code == 2 and "r.py:7: op 'transfer': source: missing.keras: no such file" in res.output
    res = run_cli("apply", p, "--set", f"sources.pretrained={CNN}")
    assert res.exit_code == 0, res.output
    out = read_all(tmp_path / "o.keras")
    np.testing.assert_array_equal(out["conv2/kernel"], read_all(CNN)["conv2/kernel"])
    assert int(out["optimizer/iteration"]) == 2
