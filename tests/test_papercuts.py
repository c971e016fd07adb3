"""Issue 11, "Noise and papercuts": messages that say what is wrong and what to do, in the
syntax the user wrote; summaries that count what their words say; audit and ops agreeing on
what is healthy; README snippets that run as pasted."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import FIXTURES, ROOT, fixture, load_keras_model, run_cli
from surgeon import open_checkpoint
from surgeon.inspect.audit import audit_path
from surgeon.core.errors import SurgeonError
from surgeon.recipe.execute import apply
from surgeon.recipe import apply_overrides, load_recipe, recipe, reinit

CNN = fixture("cnn_adam.keras")
CNN5 = fixture("recipe/cnn5_fresh.keras")
STRUCT = FIXTURES / "structure"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")


def one_line_error(res):
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgeon: error: "), res.output
    return lines[0]


# -- transplant / transfer: slice shrinks, pad grows ------------------------------------------
def test_transplant_slice_into_a_larger_head_says_to_pad(tmp_path):
    out = tmp_path / "t.keras"
    msg = one_line_error(run_cli("transplant", CNN, CNN5, "-o", out, "--layers", "head",
                                 "--on-mismatch", "slice"))
    assert "head/kernel 6x3 -> head/kernel 6x5" in msg
    assert "slice only shrinks" in msg and "the target is larger" in msg
    assert "use --on-mismatch pad" in msg and "set on_mismatch to" not in msg
    assert not out.exists()


def test_transfer_pad_into_a_smaller_head_says_to_slice_in_toml(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text(f'input = "{CNN}"\noutput = "{tmp_path / "o.keras"}"\n\n'
                 f'[[ops]]\nop = "transfer"\nsource = "{CNN5}"\non_mismatch = "pad"\n')
    msg = one_line_error(run_cli("apply", r))
    assert "pad only grows" in msg and "the target is smaller" in msg
    assert 'use on_mismatch = "slice"' in msg


# -- errors in the recipe's own syntax ---------------------------------------------------------
TWO_OPS_TOML = """\
input = "{cnn}"
output = "{out}"
iteration = 1000

[[ops]]
op = "zero"
select = "head/*"

[[ops]]
op = "rescale"
select = "head/kernel"
factor = 2.0
"""


def test_toml_recipe_errors_use_toml_syntax(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text(TWO_OPS_TOML.format(cnn=CNN, out=tmp_path / "o.keras"))
    msg = one_line_error(run_cli("apply", r))
    assert "add again = true to this op" in msg and "again=True" not in msg
    r.write_text(TWO_OPS_TOML.format(cnn=CNN, out=tmp_path / "o.keras").rsplit("[[ops]]", 1)[0])
    res = run_cli("apply", r, "--dry-run")  # zeroed Adam slots at iteration 1000: a warning
    assert res.exit_code == 0, res.output
    assert 'use slots = "warm"' in res.stderr and 'iteration = "reset"' in res.stderr


def test_python_recipe_errors_use_python_syntax(tmp_path):
    r = tmp_path / "r.py"
    r.write_text(f"from surgeon.recipe import *\nRECIPE = recipe(input={str(CNN)!r}, output='o.keras', "
                 "ops=[zero('head/*'), rescale('head/kernel', factor=2.0)])\n")
    assert "add again=True to this op" in one_line_error(run_cli("apply", r))


# -- insert-layer names the new layer as Keras does --------------------------------------------
def test_insert_layer_help_and_generated_unique_name(tmp_path):
    res = run_cli("insert-layer", "--help")
    assert "fresh Keras-style name" in " ".join(res.output.split())
    out = tmp_path / "f.keras"
    # convbn_sgdm already has a layer named "flatten": Keras would call the next one flatten_1
    res = run_cli("insert-layer", STRUCT / "convbn_sgdm.keras", "--after", "flatten",
                  "--layer-json", '{"class_name": "Flatten", "config": {}}', "-o", out)
    assert res.exit_code == 0, res.output
    assert "new layers: flatten_1" in res.output
    names = [ly.name for ly in load_keras_model(out).layers]
    assert names.index("flatten_1") == names.index("flatten") + 1 and len(set(names)) == len(names)


# -- deepen / insert after the output: refused at plan time, without TensorFlow ----------------
PLAN_AFTER_OUTPUT = """\
import sys
from surgeon import structure as S
from surgeon.core.errors import SurgeonError
for plan, args in ((S.plan_deepen, ({conv!r}, "head")), (S.plan_deepen, ({mlp!r}, "out")),
                   (S.plan_insert_layer, ({mlp!r}, "out", {{"class_name": "Dropout"}}))):
    try:
        plan(*args)
    except SurgeonError as exc:
        print(exc)
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


def test_deepen_after_the_output_layer_is_refused_at_plan_time():
    code = PLAN_AFTER_OUTPUT.format(conv=str(STRUCT / "convbn_sgdm.keras"),
                                    mlp=str(STRUCT / "mlp_adam.keras"))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and len(lines) == 4, p.stdout + p.stderr
    assert "cannot deepen after 'head': it is the model's output layer" in lines[0]
    assert "choose a layer before the output (e.g. 'flatten', its input)" in lines[0]
    assert "cannot deepen after 'out': it is the model's output layer" in lines[1]
    assert "cannot insert a layer after 'out'" in lines[2]
    assert lines[3] == "tensorflow imported: False"


# -- --help summaries are whole sentences ------------------------------------------------------
def test_every_command_summary_fits_and_every_command_has_an_example():
    from surgeon.cli import main
    for name, cmd in main.commands.items():
        short = cmd.get_short_help_str(45)  # click's default limit
        assert not short.endswith("...") and short == cmd.help.split("\n\n")[0].strip(), name
        assert "Example" in run_cli(name, "--help").output, name
    res = run_cli("--help")
    assert res.exit_code == 0 and "..." not in res.output.split("Commands:")[1]


# -- diff: undefined is not 0; say where the plot went -----------------------------------------
def test_diff_layer_header_rel_l2_undefined_for_reshaped_and_removed():
    res = run_cli("diff", CNN, CNN5, "--ignore-optimizer")
    assert "head/  (2 of 2 weights differ, rel_l2 n/a (reshaped))" in res.output
    res = run_cli("diff", CNN, CNN, "--map", "^head/=top/", "--ignore-optimizer")
    assert "top/  (2 of 2 weights differ, rel_l2 n/a (removed))" in res.output
    assert "head/  (2 of 2 weights differ, rel_l2 n/a (added))" in res.output
    assert "rel_l2 0)" not in res.output
    doc = json.loads(run_cli("diff", CNN, CNN5, "--json").output)
    head = next(ly for ly in doc["layers"] if ly["layer"] == "head")
    assert head["rel_l2"] is None and head["uncompared"] == {"reshaped": 2}


def test_diff_plot_says_where_it_wrote(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "d.png"
    res = run_cli("diff", CNN, fixture("cnn_sgdm.keras"), "--plot", png, "--json")
    assert png.stat().st_size > 0
    assert f"surgeon: wrote plot {png} (1200x500 px)" in res.stderr
    json.loads(res.stdout)  # stdout stays one JSON document


# -- apply: the summary names the structural edits ---------------------------------------------
def test_apply_summary_counts_structural_edits(tmp_path):
    r = tmp_path / "wide.py"
    r.write_text(textwrap.dedent(f"""\
        from surgeon.recipe import recipe, widen, rescale
        RECIPE = recipe(input={str(STRUCT / 'mlp_adam.keras')!r}, output={str(tmp_path / 'w.keras')!r},
                        ops=[widen(layer="fc1", to=12), rescale("out/kernel", factor=0.5, slots="follow")])
        """))
    res = run_cli("apply", r, "--no-progress")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[-2].startswith("widen (fc1, fc2): 3 tensor(s) rewritten, 0 new, 0 removed (slots follow); "
                                "then 1 tensor(s) changed, 2 slot change(s) by the tensor ops")
    assert lines[-1].startswith(f"wrote {tmp_path / 'w.keras'} (1 structural edit(s), then 1 tensors")


# -- ls: totals count what the words say -------------------------------------------------------
@pytest.mark.parametrize("name", ["cnn_adam.keras", "nested_adamw.keras"])
def test_ls_totals_count_what_they_say(name):
    with open_checkpoint(fixture(name)) as ck:
        entries = ck.entries()
    with_slots = {e.slot_of for e in entries if e.role == "slot"}
    n_slots = sum(e.role == "slot" for e in entries)
    n_glob = sum(e.role == "optimizer" for e in entries)
    last = run_cli("ls", fixture(name)).output.strip().splitlines()[-1]
    assert f"; {len(with_slots)} params with optimizer slots; {len(entries)} tensors in all " \
           f"({n_slots} slots, {n_glob} optimizer globals)" in last
    assert len(with_slots) < len(entries)


# -- audit and the ops agree on what is healthy ------------------------------------------------
SHIPPED = sorted(p.name for p in (ROOT / "recipes").iterdir()
                 if p.suffix in (".py", ".toml") and p.name != "example_data.py")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_output_audits_clean(tmp_path, monkeypatch, name):
    monkeypatch.chdir(ROOT)  # recipes name their fixtures relative to the repository root
    out = tmp_path / "out.keras"
    apply(apply_overrides(load_recipe(ROOT / "recipes" / name), output=str(out)), hash_inputs=False)
    res = audit_path(out)
    assert res.findings == [], [f.to_json() for f in res.findings]


@pytest.mark.parametrize("slots,iteration", [("reset", 1000), ("warm", 1000), ("reset", 150)])
def test_plan_warning_and_audit_agree_on_reset_moments(tmp_path, slots, iteration):
    # one rule for both: the first Adam step after zeroed second moments is >= 2x a settled
    # one (from iteration ~505 with the default betas); at 150 it is ~1.2x, neither speaks
    out = tmp_path / f"{slots}.keras"
    rec = recipe(input=str(CNN), output=str(out), iteration=iteration,
                 ops=[reinit("head/*", initializer="default", seed=0, slots=slots)])
    plan, _ = apply(rec, hash_inputs=False)
    warned = any("use slots='warm'" in w for w in plan.warnings)
    flagged = [f.tensor for f in audit_path(out).findings if f.code == "moments-reset"]
    expected = slots == "reset" and iteration == 1000
    assert warned == expected and bool(flagged) == expected, (plan.warnings, flagged)


def test_cast_slots_keep_or_follow_audit_clean(tmp_path):
    from surgeon.recipe import cast
    for slots in ("keep", "follow"):
        out = tmp_path / f"{slots}.keras"
        apply(recipe(input=str(CNN), output=str(out), ops=[cast("*", dtype="bfloat16", slots=slots)]),
              hash_inputs=False)
        assert audit_path(out).findings == [], slots


# -- README snippets run as pasted -------------------------------------------------------------
BLOCK = re.compile(r"(?:<!-- (runnable|not runnable[^>]*) -->\n)?```python\n(.*?)```", re.S)


def readme_blocks():
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer((ROOT / "README.md").read_text())]


def test_every_readme_python_block_is_marked():
    blocks = readme_blocks()
    assert blocks and all(mark for mark, _ in blocks), [code[:60] for mark, code in blocks if not mark]
    assert any("open_checkpoint" in code and ".read(" in code for mark, code in blocks if mark == "runnable")


@pytest.mark.parametrize("index", range(sum(m == "runnable" for m, _ in readme_blocks())))
def test_readme_snippets_run(tmp_path, index):
    code = [c for m, c in readme_blocks() if m == "runnable"][index]
    for d in ("fixtures", "recipes"):  # the repository root as seen by the snippet
        (tmp_path / d).symlink_to(ROOT / d)
    p = subprocess.run([sys.executable, "-"], input=code, cwd=tmp_path, capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert p.returncode == 0, f"README snippet failed:\n{code}\n{p.stderr[-3000:]}"
    written = [q for q in tmp_path.rglob("*") if q.is_file() and not any(
        part in ("fixtures", "recipes") for part in q.relative_to(tmp_path).parts)]
    assert all(str(q).startswith(str(tmp_path)) for q in written)
