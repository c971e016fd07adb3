"""Executors (issue 14 goal 4, issue 18): the same output whoever computes it.

A local process pool and a local Ray cluster (2 CPUs on 127.0.0.1, one per session) run
the same recipe as the default executor; the outputs must be bit-identical (every shard
but the first byte for byte; the first, which carries the surgery log, tree for tree
with only the log differing, in its executor and time). A Ray worker SIGKILLed mid-run
is retried (same output) or, without retries, the run fails in one line naming the shard
and nothing appears at the target.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, fixture, run_cli
from h5compare import h5_tree

RECIPE = ('from surgeon.recipe import recipe, rescale, mask\n'
          'RECIPE = recipe(ops=[rescale("d*", factor=0.5, slots="follow"),\n'
          '                     mask("head/kernel", sparsity=0.5)])\n')
LOG = "surgeon/provenance"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, keras):
    """A real Keras model trained a few steps with Adam, saved in >= 8 weight shards."""
    d = tmp_path_factory.mktemp("sharded")
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((6,))] + [keras.layers.Dense(6, name=f"d{i}") for i in range(4)]
                         + [keras.layers.Dense(2, name="head")])
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    rng = np.random.default_rng(0)
    m.fit(rng.random((16, 6), "float32"), rng.random((16, 2), "float32"), epochs=1, batch_size=8, verbose=0)
    m.save(d / "tiny.keras")
    m.save_weights(d / "tiny.weights.json", max_shard_size=300e-9)
    assert len(list(d.glob("tiny_*.weights.h5"))) >= 8
    (d / "edit.py").write_text(RECIPE)
    return d


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def _apply(d, out, executor=None, **kw):
    from surgeon.recipe import apply_overrides, load_recipe
    from surgeon.recipe.execute import apply
    from surgeon.recipe.executors import make_executor
    rec = apply_overrides(load_recipe(str(d / "edit.py")), input=str(d / "tiny.weights.json"),
                          output=str(out), model=str(d / "tiny.keras"))
    return apply(rec, executor=make_executor(executor, **kw) if executor else None)


@pytest.fixture(scope="module")
def local_out(sharded):
    out = sharded / "local" / "o.weights.json"
    out.parent.mkdir()
    _apply(sharded, out)
    return out


def _log(path):
    from surgeon.formats.provenance import read_log
    return read_log(path)[-1]


def assert_same_output(a, b, names):
    """Every file of output ``a`` equals ``b``'s; the first shard up to its surgery log."""
    for i, n in enumerate(names):
        fa, fb = a.with_name(n), b.with_name(n)
        if i == 0 or n.endswith(".keras"):
            ta, tb = h5_tree(fa), h5_tree(fb)
            assert sorted(ta) == sorted(tb)
            assert [k for k in ta if ta[k] != tb[k]] == [LOG]
        else:
            assert fa.read_bytes() == fb.read_bytes(), n
    assert_same_record(_log(a), _log(b), a, b)


def assert_same_record(la, lb, a, b):
    """The two surgery-log records agree but for time, executor and output path."""
    def strip(rec, out):
        rec = {k: v for k, v in rec.items() if k not in ("time", "executor")}
        return json.loads(json.dumps(rec).replace(str(out), "OUT"))
    assert strip(la, a) == strip(lb, b)


def _names(out):
    index = json.loads(out.read_text())
    shards = sorted({f for v in index["weight_map"].values() for f in (v if isinstance(v, list) else [v])})
    return shards + [out.name]


def test_pool_identical_to_local_keras(tmp_path, monkeypatch):
    """.keras through a 2-process pool, chunks of 2 groups (6 tasks): same bytes but the log."""
    from surgeon.recipe import executors
    monkeypatch.setattr(executors, "CHUNK_GROUPS", 2)
    (tmp_path / "r.py").write_text('from surgeon.recipe import recipe, rescale\n'
                                   'RECIPE = recipe(ops=[rescale("*", factor=0.5, slots="follow")])\n')
    outs = {}
    for ex in ("local", "pool"):
        outs[ex] = tmp_path / f"{ex}.keras"
        res = run_cli("apply", tmp_path / "r.py", "-i", fixture("cnn_adam.keras"), "-o", outs[ex],
                      "--executor", ex, "--no-progress", *(["--workers", "2"] if ex == "pool" else []))
        assert res.exit_code == 0, res.output
    import zipfile
    with zipfile.ZipFile(outs["local"]) as za, zipfile.ZipFile(outs["pool"]) as zb:
        assert za.namelist() == zb.namelist()
        differ = [n for n in za.namelist() if za.read(n) != zb.read(n)]
        assert differ == ["surgeon/provenance.json"]
        la, lb = (json.loads(z.read(differ[0]))[-1] for z in (za, zb))
    assert la["executor"]["name"] == "local" and la["executor"]["tasks"] == 1
    assert lb["executor"] | {"hosts": None} == {"name": "pool", "workers": 2, "tasks": 6, "hosts": None}
    assert_same_record(la, lb, outs["local"], outs["pool"])


def test_pool_identical_to_local_sharded(sharded, local_out, monkeypatch):
    from surgeon.recipe import executors
    monkeypatch.setattr(executors, "CHUNK_GROUPS", 2)
    out = sharded / "pool" / "o.weights.json"
    out.parent.mkdir()
    _apply(sharded, out, "pool", workers=2)
    assert_same_output(local_out, out, _names(local_out))


def test_ray_sharded_identical_to_local(sharded, local_out, ray_cluster, keras):
    out = sharded / "ray" / "o.weights.json"
    out.parent.mkdir()
    plan, stats = _apply(sharded, out, "ray")
    names = _names(local_out)
    assert len(names) >= 9 and _names(out) == names
    assert_same_output(local_out, out, names)
    info = _log(out)["executor"]
    assert info["name"] == "ray" and info["tasks"] == len(names) - 1 and info["hosts"]
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(names)  # no temp left
    # Keras loads what the Ray tasks wrote: the values are the local executor's
    model = keras.saving.load_model(sharded / "tiny.keras")
    model.load_weights(out)
    ref = keras.saving.load_model(sharded / "tiny.keras")
    ref.load_weights(local_out)
    for a, b in zip(model.weights, ref.weights):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _kill_one_task(stop, killed):
    """SIGKILL the first Ray worker process found running a shard task."""
    while not stop.is_set() and not killed:
        for pid in os.listdir("/proc"):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if pid.isdigit() and cmd.startswith(b"ray::shard_task"):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.02)


def _run_with_kill(sharded, out, retries):
    stop, killed = threading.Event(), []
    t = threading.Thread(target=_kill_one_task, args=(stop, killed))
    t.start()
    try:
        _apply(sharded, out, "ray", retries=retries, pause=0.5, workers=2)
    finally:
        stop.set()
        t.join()
    assert killed, "no Ray task was seen running"


def test_ray_worker_killed_is_retried(sharded, local_out, ray_cluster):
    out = sharded / "ray_retry" / "o.weights.json"
    out.parent.mkdir()
    _run_with_kill(sharded, out, retries=3)
    assert_same_output(local_out, out, _names(local_out))


def test_ray_worker_killed_without_retry_leaves_nothing(sharded, ray_cluster):
    from surgeon.core.errors import SurgeonError
    out = sharded / "ray_fail" / "o.weights.json"
    out.parent.mkdir()
    with pytest.raises(SurgeonError) as err:
        _run_with_kill(sharded, out, retries=0)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("shard o_0000") and "nothing was written" in msg
    assert list(out.parent.iterdir()) == []


def test_ray_refuses_one_file_target(tmp_path):
    pytest.importorskip("ray")
    res = run_cli("apply", ROOT / "recipes/reset_head.py", "-i", fixture("cnn_adam.keras"),
                  "-o", tmp_path / "o.keras", "--executor", "ray")
    assert res.exit_code == 2
    assert "--executor ray writes sharded outputs only" in res.output and "--executor pool" in res.output
    assert list(tmp_path.iterdir()) == []


def test_ray_missing_says_what_to_install(tmp_path):
    code = ("import sys\nsys.modules['ray'] = None\nfrom surgeon.cli import main\n"
            "main(sys.argv[1:])\n")
    res = subprocess.run([sys.executable, "-c", code, "apply", str(ROOT / "recipes/reset_head.py"), "-i",
                          str(fixture("cnn_adam_sharded.weights.json")), "-o", str(tmp_path / "o.weights.json"),
                          "--executor", "ray"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2
    assert res.stderr.strip() == ("surgeon: error: --executor ray needs Ray: pip install "
                                  "'surgeon[ray]' (or pip install ray)")
    assert list(tmp_path.iterdir()) == []
