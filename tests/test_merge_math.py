"""The merge arithmetic (surgeon.merging) on hand-computed cases: TIES, model stock, SLERP,
DARE's seeding and rescaling; and ``surgeon merge`` on the committed Keras-saved fixtures.
No TensorFlow; the identities on trained fine-tunes of one base are in test_merge.py."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, fixture, run_cli
from surgeon.core.errors import SurgeonError
from surgeon.merging import methods as mm


def merge(method, models, base=None, key="t", **params):
    p = mm.check_params(method, params, len(models))
    return mm.merge_tensor(method, [np.asarray(m, np.float32) for m in models],
                           None if base is None else np.asarray(base, np.float32), p, key)


def test_ties_by_hand():
    base = np.ones(6)
    t1 = np.array([3, -1, 2, 0.5, 2.5, 0])
    t2 = np.array([-2, -4, 1, 0.1, 3.5, 0])
    # density 0.5 keeps 3 of 6: t1 -> [3, 0, 2, 0, 2.5, 0]; t2 -> [-2, -4, 0, 0, 3.5, 0];
    # elected signs of the sum [1, -4, 2, 0, 6, 0]: + - + 0 + 0; disjoint means:
    want = base + np.array([3, -4, 2, 0, (2.5 + 3.5) / 2, 0])
    got = merge("ties", [base + t1, base + t2], base, density=0.5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # per-model density and weight, lambda: t1 keeps 1 (3), t2 keeps all; weights 2, 1
    got = merge("ties", [base + t1, base + t2], base, density=[1 / 6, 1.0], weight=[2, 1],
                scale=0.5)
    # w*t: [6,0,0,0,0,0], [-2,-4,1,0.1,3.5,0]; sum [4,-4,1,.1,3.5,0]
    mean = np.array([(6) / 2, -4 / 1, 1 / 1, 0.1 / 1, 3.5 / 1, 0])
    np.testing.assert_allclose(got, base + 0.5 * mean, rtol=0, atol=1e-6)


def test_model_stock_by_hand():
    base = np.zeros(2)
    # task vectors [1, 0], [1, 1]: cos = 1/sqrt 2, k = 2: t = 2c / (1 + c) = 2 sqrt 2 - 2
    got = merge("model_stock", [[1, 0], [1, 1]], base)
    t = 2 * np.sqrt(2) - 2
    np.testing.assert_allclose(got, t * np.array([1, 0.5]), rtol=1e-6)
    assert mm.model_stock_ratio([np.array([1.0, 0]), np.array([-1.0, 0])], base) == 0.0  # opposed: base


def test_slerp_by_hand_and_endpoints():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    np.testing.assert_allclose(merge("slerp", [a, b], t=0.5), [np.sqrt(0.5)] * 2, rtol=1e-6)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    assert np.array_equal(merge("slerp", [x, y], t=0.0), x.astype(np.float32))
    assert np.array_equal(merge("slerp", [x, y], t=1.0), y.astype(np.float32))
    # nearly colinear: linear interpolation
    np.testing.assert_allclose(merge("slerp", [x, 2 * x], t=0.25), 1.25 * x, rtol=1e-6)


def test_dare_seeded_rescaled_and_p0_is_task_arithmetic():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(64, 32)).astype(np.float32)
    a = base + rng.normal(size=base.shape).astype(np.float32)
    one = merge("dare", [a], base, p=0.4, seed=3, key="fc/kernel")
    assert np.array_equal(one, merge("dare", [a], base, p=0.4, seed=3, key="fc/kernel"))
    assert not np.array_equal(one, merge("dare", [a], base, p=0.4, seed=4, key="fc/kernel"))
    assert not np.array_equal(one, merge("dare", [a], base, p=0.4, seed=3, key="fc/bias"))
    kept = one != base
    assert 0.5 < kept.mean() < 0.7  # ~60% kept
    want = base.astype(np.float64) + (a.astype(np.float64) - base) / 0.6
    np.testing.assert_allclose(one[kept], want[kept].astype(np.float32), rtol=1e-6)
    b = base + rng.normal(size=base.shape).astype(np.float32)
    ta = merge("task_arithmetic", [a, b], base, weight=[0.3, 0.7], scale=0.9)
    assert np.array_equal(merge("dare", [a, b], base, p=0.0, weight=[0.3, 0.7], scale=0.9), ta)
    np.testing.assert_allclose(ta, base + 0.9 * (0.3 * (a - base) + 0.7 * (b - base)), atol=1e-5)


def test_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(2)
    base = rng.normal(size=1000).astype(np.float32)
    ms = [base + rng.normal(size=1000).astype(np.float32) for _ in range(3)]
    whole = {m: merge(m, ms, base, **kw) for m, kw in
             [("ties", {"density": 0.3}), ("dare", {"p": 0.5, "combine": "ties"}),
              ("model_stock", {})]}
    monkeypatch.setattr(mm, "CHUNK", 37)
    for m, kw in [("ties", {"density": 0.3}), ("dare", {"p": 0.5, "combine": "ties"}),
                  ("model_stock", {})]:
        assert np.array_equal(merge(m, ms, base, **kw), whole[m]), m


@pytest.mark.parametrize("method,params,n,msg", [
    ("slerp", {"t": 0.5}, 3, "exactly two models"),
    ("ties", {"density": [0.5]}, 2, "1 value(s) for 2 model(s)"),
    ("ties", {"t": 0.5}, 2, "takes no parameter 't'"),
    ("dare", {"p": 1.0}, 2, "must be in [0, 1)"),
    ("model_stock", {}, 1, "at least two"),
    ("linear", {"weight": [1, -1]}, 2, "sum to 0"),
])
def test_parameter_refusals(method, params, n, msg):
    with pytest.raises(SurgeonError, match=".*" + msg.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        mm.check_params(method, params, n)


def test_committed_fixtures_merge_exactly_and_shape_mismatch_is_refused(tmp_path):
    """Keras-saved cnn_adam merged with itself is itself; with the 5-class head of
    cnn5_fresh it is refused at plan time (one line, exit 2, nothing written); no TF."""
    from surgeon.formats import open_checkpoint
    a, five = fixture("cnn_adam.keras"), fixture("recipe/cnn5_fresh.keras")
    out = tmp_path / "same.keras"
    # in a fresh process: this one may have loaded TensorFlow for another test already
    code = ("import sys; from surgeon.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
            "assert not bad, bad  # merging .keras files needs no TF\n")
    p = subprocess.run([sys.executable, "-c", code, "merge", str(a), str(a), "--weight", "0.3,0.7",
                        "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    with open_checkpoint(a) as x, open_checkpoint(out) as y:
        for e in x.entries():
            if e.role in ("param", "state"):
                assert np.array_equal(x.read(e.name), y.read(e.name)), e.name
    bad = tmp_path / "bad.keras"
    res = run_cli("merge", a, five, "-o", bad)
    assert res.exit_code == 2 and not bad.exists()
    assert res.output == (f"surgeon: error: surgeon merge: op 'merge': head/kernel has shape (6, 5) "
                          f"in {five} but (6, 3) in {a}; models of different shapes cannot be "
                          "merged\n")
