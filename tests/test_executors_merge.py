"""``merge`` and ``convert`` by executor (issue 18): the same output whoever computes it.

A sharded ``.weights.json`` (>= 8 shards, Keras-written) and its fine-tune are merged by
the local executor, a 2-process pool and the session's local Ray cluster (one task per
output shard); converted to a sharded target locally, by the pool and on Ray. The outputs
are bit-identical (the first shard, which carries the surgery log, tree for tree but the
log's executor and time), Keras loads them, and the log records the executor, its tasks
and hosts. A Ray worker SIGKILLed mid-merge (no retry) fails the run in one line naming
its shard, with nothing at the target; one-file outputs and a missing Ray are refused.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, fixture, load_keras_model, run_cli
from test_executors import _kill_one_task, _log, _names, assert_same_output, assert_same_record


def _merge(d, out, executor=None):
    from surgeon.recipe.merging import merge_checkpoints
    out.parent.mkdir()
    return merge_checkpoints([d / "tiny.weights.json", d / "tuned.weights.json"], out,
                             params={"weight": [0.3, 0.7]}, model=d / "tiny.keras",
                             hash_inputs=False, executor=executor)


@pytest.fixture(scope="module")
def merged_local(sharded_ckpt):
    out = sharded_ckpt / "merge_local" / "m.weights.json"
    _merge(sharded_ckpt, out)
    return out


def test_merge_pool_and_ray_identical_to_local(sharded_ckpt, merged_local, ray_cluster, monkeypatch):
    from surgeon.recipe import executors
    monkeypatch.setattr(executors, "CHUNK_GROUPS", 2)  # 10 merged groups: 5 pool tasks
    pool = sharded_ckpt / "merge_pool" / "m.weights.json"
    _merge(sharded_ckpt, pool, executors.make_executor("pool", workers=2))
    ray = sharded_ckpt / "merge_ray" / "m.weights.json"
    _merge(sharded_ckpt, ray, executors.make_executor("ray", workers=2))
    d = sharded_ckpt
    names = _names(merged_local)
    assert len(names) >= 9 and _names(pool) == _names(ray) == names
    for out in (pool, ray):
        assert_same_output(merged_local, out, names)
        assert sorted(p.name for p in out.parent.iterdir()) == sorted(names)  # no temp left
    assert _log(pool)["executor"] | {"hosts": None} == {"name": "pool", "workers": 2, "tasks": 5,
                                                         "hosts": None}
    info = _log(ray)["executor"]
    assert info["name"] == "ray" and info["tasks"] == len(names) - 1 and info["workers"] == 2
    assert info["hosts"] and all(isinstance(h, str) and h for h in info["hosts"])
    # what Ray wrote, Keras loads (no warning): 0.3 * tiny + 0.7 * tuned, optimizer fresh
    m = load_keras_model(d / "tiny.keras")
    a = [np.asarray(w) for w in m.weights]
    m.load_weights(d / "tuned.weights.json")
    b = [np.asarray(w) for w in m.weights]
    m = load_keras_model(ray, weights_of=d / "tiny.keras")
    for x, y, z in zip(a, b, m.weights):
        np.testing.assert_allclose(np.asarray(z), 0.3 * x + 0.7 * y, rtol=1e-6)
    assert int(m.optimizer.iterations.numpy()) == 0


def test_ray_worker_killed_mid_merge_leaves_nothing(sharded_ckpt, ray_cluster):
    """A worker SIGKILLed mid-merge, no retry: one line naming the shard, nothing written
    (the retried case is apply's test: the same ``run_sharded``)."""
    import threading

    from surgeon.core.errors import SurgeonError
    from surgeon.recipe.executors import make_executor
    out = sharded_ckpt / "merge_kill" / "m.weights.json"
    stop, killed = threading.Event(), []
    t = threading.Thread(target=_kill_one_task, args=(stop, killed))
    t.start()
    try:
        with pytest.raises(SurgeonError) as err:
            _merge(sharded_ckpt, out, make_executor("ray", workers=2, retries=0, pause=0.5))
    finally:
        stop.set()
        t.join()
    assert killed, "no Ray task was seen running"
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("shard m_0000") and "nothing was written" in msg
    assert list(out.parent.iterdir()) == []


def test_convert_sharded_pool_and_ray_identical_to_local(sharded_ckpt, ray_cluster):
    from surgeon.convert import convert
    from surgeon.recipe.executors import make_executor
    d = sharded_ckpt
    outs = {}
    for ex in ("local", "pool", "ray"):
        outs[ex] = d / f"convert_{ex}" / "c.weights.json"
        outs[ex].parent.mkdir()
        rep = convert(d / "tiny.weights.json", outs[ex], model=d / "tiny.keras",
                      executor=make_executor(ex, workers=None if ex == "local" else 2))
        assert rep.iterations == 2 and rep.target_format == "keras-weights-sharded"
    names = _names(outs["local"])
    assert len(names) >= 9  # the source's shard size by default
    for ex in ("pool", "ray"):
        assert _names(outs[ex]) == names
        assert_same_output(outs["local"], outs[ex], names, same_record=_same_convert_record)
        assert sorted(p.name for p in outs[ex].parent.iterdir()) == sorted(names)
    assert _log(outs["local"])["executor"] | {"hosts": None} == {"name": "local", "workers": 1,
                                                                  "tasks": 1, "hosts": None}
    assert _log(outs["pool"])["executor"]["tasks"] == len(names) - 1
    info = _log(outs["ray"])["executor"]
    assert info["name"] == "ray" and info["tasks"] == len(names) - 1 and info["hosts"]
    # Keras loads the converted checkpoint (no warning): every weight and optimizer variable
    # is the source's (tiny.keras holds the same values as tiny.weights.json)
    src = load_keras_model(d / "tiny.keras")
    want = [np.asarray(v) for v in src.weights + src.optimizer.variables]
    got = load_keras_model(outs["ray"], weights_of=d / "tiny.keras")
    for x, y in zip(want, got.weights + got.optimizer.variables):
        assert np.array_equal(x, np.asarray(y))


def _same_convert_record(la, lb, a, b):
    """As ``assert_same_record``; the command's hash covers the output path too."""
    for rec in (la, lb):
        rec["recipe"].pop("sha256")
    assert_same_record(la, lb, a, b)


@pytest.mark.parametrize("cmd", ["merge", "convert"])
def test_ray_refuses_one_file_output(cmd, tmp_path):
    pytest.importorskip("ray")
    src = fixture("cnn_adam.keras")
    args = [src, src, "-o", tmp_path / "o.keras"] if cmd == "merge" else [src, tmp_path / "o.keras"]
    res = run_cli(cmd, *args, "--executor", "ray")
    assert res.exit_code == 2
    assert "sharded" in res.output and ".weights.json" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert list(tmp_path.iterdir()) == []


def test_ray_start_timeout_is_one_line(sharded_ckpt, tmp_path, monkeypatch):
    """A local Ray node that times out starting (a bare Exception from ray.init, seen on a
    loaded machine) ends merge in one line, with nothing written."""
    ray = pytest.importorskip("ray")

    def init(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because "
                        "some of the raylet failed to startup or the GCS has become overloaded.")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    d = sharded_ckpt
    res = run_cli("merge", d / "tiny.weights.json", d / "tuned.weights.json", "--model", d / "tiny.keras",
                  "-o", tmp_path / "m.weights.json", "--executor", "ray")
    assert res.exit_code == 2, res.output
    assert res.output.strip() == ("surgeon: error: cannot connect to the Ray cluster (local): The "
                                  "current node timed out during startup. This could happen because "
                                  "some of the raylet failed to startup or the GCS has become overloaded.")
    assert list(tmp_path.iterdir()) == []


def test_ray_missing_says_what_to_install(tmp_path):
    """merge and convert --executor ray without Ray: one line each, nothing written."""
    code = ("import sys\nsys.modules['ray'] = None\nfrom surgeon.cli import main\n"
            "src, out = sys.argv[1:]\n"
            "for cmd in (['merge', src, src, '-o', out], ['convert', src, out]):\n"
            "    try:\n        main(cmd + ['--executor', 'ray'])\n"
            "    except SystemExit as e:\n        print(cmd[0], e.code)\n")
    src, out = str(fixture("cnn_adam_sharded.weights.json")), str(tmp_path / "o.weights.json")
    res = subprocess.run([sys.executable, "-c", code, src, out], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.stdout.split() == ["merge", "2", "convert", "2"], res.stdout + res.stderr
    line = "surgeon: error: --executor ray needs Ray: pip install 'surgeon[ray]' (or pip install ray)"
    assert res.stderr.strip().splitlines() == [line, line]
    assert list(tmp_path.iterdir()) == []
