"""surgeon diff: real Keras fixtures, edits made with surgeon's writer, stats vs numpy."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import COMBOS, ROOT, fixture, run_cli
from surgeon import open_checkpoint, open_writer
from surgeon.inspect.diff import diff_checkpoints, diff_paths
from surgeon.inspect.stream import iter_chunks

BASE = "cnn_adam.keras"


def _edit(src, out, edits):
    with open_checkpoint(src) as r, open_writer(out, like=r) as w:
        for name, fn in edits.items():
            w.write(name, fn(r.read(name)))
        w.finalize()
    return out


def _bump(a):
    b = a.copy()
    b.reshape(-1)[::5] += 0.5
    return b


@pytest.fixture(scope="session")
def edited(tmp_path_factory):
    """cnn_adam with conv2/kernel (every 5th element +0.5) and head/bias (x2) edited."""
    out = tmp_path_factory.mktemp("diff") / "edited.keras"
    return _edit(fixture(BASE), out, {"conv2/kernel": _bump, "head/bias": lambda a: a * 2})


def _json(*args):
    res = run_cli("diff", *args, "--json")
    return res, json.loads(res.output)


def test_identical_files_exit_0_and_equal(tmp_path):
    copy = tmp_path / "copy.keras"
    shutil.copyfile(fixture(BASE), copy)
    res = run_cli("diff", fixture(BASE), copy)
    assert res.exit_code == 0
    assert res.output.splitlines()[0] == "equal: 30 tensors compared, none differ (atol=0, rtol=0)"
    assert res.output.splitlines()[1] == (f"A: {fixture(BASE)} [keras]  optimizer Adam iterations=3 "
                                          "learning_rate=0.01")


def test_edit_reports_exactly_the_edited_tensors_with_numpy_stats(edited):
    res, out = _json(fixture(BASE), edited)
    assert res.exit_code == 1
    assert out["equal"] is False
    changed = {t["name"]: t for t in out["tensors"] if t["status"] != "equal"}
    assert sorted(changed) == ["conv2/kernel", "head/bias"]
    assert out["summary"] == {"equal": 28, "changed": 2, "reshaped": 0, "retyped": 0, "added": 0,
                              "removed": 0, "tensors": 30}
    with open_checkpoint(fixture(BASE)) as ra, open_checkpoint(edited) as rb:
        for name, t in changed.items():
            a, b = ra.read(name).astype(np.float64).ravel(), rb.read(name).astype(np.float64).ravel()
            d = b - a
            assert t["max_abs"] == pytest.approx(np.abs(d).max(), rel=1e-12)
            assert t["rel_l2"] == pytest.approx(np.linalg.norm(d) / np.linalg.norm(a), rel=1e-9)
            assert t["cosine"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-9)
            assert t["frac_changed"] == pytest.approx(np.count_nonzero(a != b) / a.size)
            assert t["n_changed"] == np.count_nonzero(a != b)
            assert t["norm_a"] == pytest.approx(np.linalg.norm(a), rel=1e-12)
            assert t["norm_b"] == pytest.approx(np.linalg.norm(b), rel=1e-12)
    assert changed["conv2/kernel"]["n_changed"] == 29  # ceil(144 / 5)


def test_edit_flags_params_whose_slots_did_not_change(edited):
    res, out = _json(fixture(BASE), edited)
    assert out["flags"] == [
        {"tensor": "conv2/kernel", "message": "param changed but its optimizer slots (momentum, velocity) did not"},
        {"tensor": "head/bias", "message": "param changed but its optimizer slots (momentum, velocity) did not"}]


def test_slots_changed_param_not_is_flagged(tmp_path):
    out = _edit(fixture(BASE), tmp_path / "s.keras", {"optimizer/conv1/bias/velocity": np.zeros_like})
    res = run_cli("diff", fixture(BASE), out)
    assert res.exit_code == 1
    assert "flag: conv1/bias: optimizer slots changed (velocity) but the param did not" in res.output


def test_text_table_grouped_by_layer(edited):
    res = run_cli("diff", fixture(BASE), edited)
    lines = res.output.splitlines()
    assert lines[0].startswith("different: 2 of 30 tensors differ (2 changed); largest |B-A| 0.5 in conv2/kernel")
    assert "conv2/  (1 of 2 weights differ, rel_l2 " in res.output
    row = next(ln for ln in lines if ln.startswith("  kernel "))
    assert row.split()[:2] == ["kernel", "changed"] and row.split()[5] == "20.1%"
    assert "head/  (1 of 2 weights differ" in res.output
    assert "  bias  " in res.output and "conv1/" not in res.output  # equal layers are omitted
    assert "conv1/" in run_cli("diff", fixture(BASE), edited, "--all").output


def test_markdown(edited):
    res = run_cli("diff", fixture(BASE), edited, "--markdown")
    assert res.exit_code == 1
    assert res.output.startswith("**surgeon diff** — different: 2 of 30 tensors differ")
    assert "| tensor | status | max abs Δ | rel L2 | cosine | changed | ‖A‖ | ‖B‖ |" in res.output
    assert "| `conv2/kernel` | changed | 0.5 |" in res.output


def test_tolerances(tmp_path):
    out = _edit(fixture(BASE), tmp_path / "t.keras", {"head/kernel": lambda a: a + np.float32(1e-4)})
    assert run_cli("diff", fixture(BASE), out).exit_code == 1
    assert run_cli("diff", fixture(BASE), out, "--atol", "2e-4").exit_code == 0
    res = run_cli("diff", fixture(BASE), out, "--rtol", "1e-9")
    assert res.exit_code == 1
    res = run_cli("diff", fixture(BASE), out, "--atol", "1e-4", "--rtol", "1e-6")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("equal: 30 tensors compared, none differ (atol=0.0001, rtol=1e-06)")


@pytest.mark.parametrize("combo", COMBOS)
def test_cross_format_keras_vs_weights_h5_is_equal(combo):
    res = run_cli("diff", fixture(f"{combo}.keras"), fixture(f"{combo}.weights.h5"),
                  "--model", fixture(f"{combo}.keras"))
    assert res.exit_code == 0, res.output
    assert res.output.startswith("equal: ")


def test_cross_format_sharded_and_unbound_slots():
    res = run_cli("diff", fixture(BASE), fixture("cnn_adam_sharded.weights.json"), "--model", fixture(BASE))
    assert res.exit_code == 0, res.output
    # without --model the bare file's slots are unresolved: they cannot pair by name
    res, out = _json(fixture(BASE), fixture("cnn_adam.weights.h5"))
    assert res.exit_code == 1
    assert out["summary"]["removed"] == 8 and out["summary"]["added"] == 8


def test_reshaped_retyped_added_removed(tmp_path):
    out = _edit(fixture(BASE), tmp_path / "r.keras",
                {"head/bias": lambda a: np.zeros(4, a.dtype), "conv1/bias": lambda a: a.astype(np.float16)})
    res, js = _json(fixture(BASE), out, "--ignore-optimizer")
    st = {t["name"]: t for t in js["tensors"]}
    assert st["head/bias"]["status"] == "reshaped"
    assert st["head/bias"]["shape_a"] == [3] and st["head/bias"]["shape_b"] == [4]
    assert st["head/bias"]["norm_b"] == 0.0 and st["head/bias"]["max_abs"] is None
    assert st["conv1/bias"]["status"] == "retyped"
    assert (st["conv1/bias"]["dtype_a"], st["conv1/bias"]["dtype_b"]) == ("float32", "float16")
    text = run_cli("diff", fixture(BASE), out, "--ignore-optimizer").output
    assert "(3,) -> (4,)" in text and "float32 -> float16" in text
    res, js = _json(fixture(BASE), fixture(BASE), "--map", "^head/=out/", "--ignore-optimizer")
    st = {t["name"]: t["status"] for t in js["tensors"]}
    assert st["out/kernel"] == st["out/bias"] == "removed"
    assert st["head/kernel"] == st["head/bias"] == "added"
    assert res.exit_code == 1


def test_map_pairs_renamed_tensors(tmp_path):
    # A renamed by --map to B's names: conv1 <-> conv2 swapped pairs differ, the rest equal
    res, js = _json(fixture(BASE), fixture(BASE), "--map", "conv1/=X/", "--map", "conv2/=conv1/",
                    "--map", "X/=conv2/", "--only", "conv*")
    assert {t["name"] for t in js["tensors"]} >= {"conv1/kernel", "optimizer/conv2/bias/velocity"}
    st = {t["name"]: t["status"] for t in js["tensors"]}
    assert st["conv1/kernel"] == "reshaped" and st["conv1/bias"] == "changed"


def test_only_and_ignore_optimizer(edited):
    res, js = _json(fixture(BASE), edited, "--only", "conv2/*")
    assert [t["name"] for t in js["tensors"]] == [
        "conv2/kernel", "conv2/bias", "optimizer/conv2/kernel/momentum", "optimizer/conv2/kernel/velocity",
        "optimizer/conv2/bias/momentum", "optimizer/conv2/bias/velocity"]
    res, js = _json(fixture(BASE), edited, "--ignore-optimizer")
    assert len(js["tensors"]) == 12 and not any(t["name"].startswith("optimizer/") for t in js["tensors"])
    res, js = _json(fixture(BASE), edited, "--only", "conv1/*")
    assert res.exit_code == 0 and js["equal"] is True


def test_optimizer_iteration_and_learning_rate_shown(tmp_path):
    out = _edit(fixture(BASE), tmp_path / "it.keras", {"optimizer/iteration": lambda a: a + 7,
                                                       "optimizer/learning_rate": lambda a: a / 10})
    res, js = _json(fixture(BASE), out)
    assert js["a"]["optimizer"]["iterations"] == 3 and js["b"]["optimizer"]["iterations"] == 10
    assert js["b"]["optimizer"]["learning_rate"] == pytest.approx(0.001)
    assert sorted(t["name"] for t in js["tensors"] if t["status"] == "changed") == [
        "optimizer/iteration", "optimizer/learning_rate"]
    text = run_cli("diff", fixture(BASE), out).output
    assert "B: " in text and "optimizer Adam iterations=10 learning_rate=0.001" in text


def test_streaming_chunks_give_the_same_stats(edited):
    with open_checkpoint(fixture(BASE)) as ra, open_checkpoint(edited) as rb:
        chunks = list(iter_chunks(rb, "conv2/kernel", 100))
        assert len(chunks) == 3 and np.array_equal(np.concatenate(chunks), rb.read("conv2/kernel"))
        whole = diff_checkpoints(ra, rb).to_json()
        tiny = diff_checkpoints(ra, rb, chunk_bytes=64).to_json()
    for t, u in zip(whole["tensors"], tiny["tensors"]):
        for k in ("status", "n_changed", "max_abs"):
            assert t[k] == u[k]
        for k in ("rel_l2", "cosine", "norm_a"):
            assert t[k] == pytest.approx(u[k], rel=1e-12)


def test_library_api_matches_cli(edited):
    r = diff_paths(fixture(BASE), edited)
    assert not r.equal and [t.name for t in r.tensors if t.status == "changed"] == ["conv2/kernel", "head/bias"]


def test_errors_exit_2():
    res = run_cli("diff", fixture(BASE), "nope.keras")
    assert res.exit_code == 2
    assert res.output.strip() == "surgeon: error: nope.keras: no such file"
    res = run_cli("diff", fixture(BASE), fixture(BASE), "--map", "nothing")
    assert res.exit_code == 2
    assert "surgeon: error: --map 'nothing': expected 'regex=replacement'" in res.output
    res = run_cli("diff", fixture(BASE), fixture(BASE), fixture(BASE))
    assert res.exit_code == 2
    assert res.output.strip() == ("surgeon: error: diff takes 2 checkpoints (A B), got 3; "
                                  "use --series for a run of checkpoints")
    res = run_cli("diff", fixture(BASE), fixture(BASE), "--atol", "-1")
    assert res.exit_code == 2 and "tolerances must be >= 0" in res.output


def test_help_has_example():
    res = run_cli("diff", "--help")
    assert res.exit_code == 0 and "Examples:" in res.output and "surgeon diff --series" in res.output


def test_never_imports_tensorflow():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom surgeon.cli import main\n"
            f"r = CliRunner().invoke(main, ['diff', r'{fixture(BASE)}', r'{fixture('cnn_adam.weights.h5')}',"
            f" '--model', r'{fixture(BASE)}'])\n"
            f"a = CliRunner().invoke(main, ['audit', r'{fixture(BASE)}'])\n"
            "print(r.exit_code, a.exit_code, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["0", "0", "False", "False"]


def test_realworld_legacy_h5_against_itself():
    from conftest import realworld
    p = realworld("emotion_model.hdf5")
    res = run_cli("diff", p, p, "--json")
    out = json.loads(res.output)
    assert res.exit_code == 0 and out["equal"] is True and out["summary"]["tensors"] > 0
    assert out["a"]["format"] == "legacy-h5"


@pytest.fixture(scope="session")
def applied(tmp_path_factory):
    """Outputs of two ready recipes run with ``surgeon apply`` (another area's engine)."""
    pytest.importorskip("surgeon.recipe")
    d = tmp_path_factory.mktemp("recipes")
    out = {}
    for name, extra in (("reset_head", []), ("prune_magnitude", []),
                        ("prune_keep", ["--set", "ops.0.slots=keep"])):
        recipe = ROOT / "recipes" / f"{'prune_magnitude' if name == 'prune_keep' else name}.py"
        res = run_cli("apply", recipe, "-o", d / f"{name}.keras", *extra)
        assert res.exit_code == 0, res.output
        out[name] = d / f"{name}.keras"
    return out


def test_recipe_edit_reports_exactly_the_edited_tensors(applied):
    res, js = _json(fixture(BASE), applied["reset_head"])
    assert res.exit_code == 1
    assert sorted(t["name"] for t in js["tensors"] if t["status"] != "equal") == [
        "head/bias", "head/kernel", "optimizer/head/bias/momentum", "optimizer/head/bias/velocity",
        "optimizer/head/kernel/momentum", "optimizer/head/kernel/velocity"]
    assert js["flags"] == []  # params and their slots changed together
    slots = {t["name"]: t for t in js["tensors"] if t["name"].startswith("optimizer/head/")}
    assert all(t["norm_b"] == 0.0 and t["rel_l2"] == pytest.approx(1.0) for t in slots.values())


def test_audit_of_pruned_recipe_outputs(applied):
    from surgeon.inspect.audit import audit_path
    codes = {f.code for f in audit_path(applied["prune_magnitude"]).findings}
    assert not codes & {"masked-moments", "masked-nonzero"}
    kept = [f for f in audit_path(applied["prune_keep"]).findings if f.code == "masked-moments"]
    assert kept and all("masked (stored pruning mask) weights have non-zero optimizer moments" in f.message
                        for f in kept)
