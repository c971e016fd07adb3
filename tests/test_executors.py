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
def sharded(sharded_ckpt):
    """The session's sharded checkpoint (conftest) and the recipe the tests apply."""
    (sharded_ckpt / "edit.py").write_text(RECIPE)
    return sharded_ckpt


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


def assert_same_output(a, b, names, same_record=None):
    """Every file of output ``a`` equals ``b``'s; the first shard up to its surgery log."""
    for i, n in enumerate(names):
        fa, fb = a.with_name(n), b.with_name(n)
        if i == 0 or n.endswith(".keras"):
            ta, tb = h5_tree(fa), h5_tree(fb)
            assert sorted(ta) == sorted(tb)
            assert [k for k in ta if ta[k] != tb[k]] == [LOG]
        else:
            assert fa.read_bytes() == fb.read_bytes(), n
    (same_record or assert_same_record)(_log(a), _log(b), a, b)


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


def _hdf5_only(monkeypatch):
    """Turn off the fast paths (raw reads, raw writes): every byte through h5py."""
    from surgeon.formats import keras_h5, keras_patch
    monkeypatch.setattr(keras_h5.KerasH5Reader, "_read_raw", lambda self, ds: None)
    monkeypatch.setattr(keras_patch._PatchBase, "raw_regions", lambda self, names: {})


def test_pool_identical_to_local_keras(tmp_path, monkeypatch):
    """.keras through a 2-process pool, chunks of 2 groups (6 tasks): same bytes but the log,
    and the same as with every byte read and written through h5py (no raw fast path). The
    forked workers adopt the planned context: none opens the input again."""
    from surgeon.recipe import executors, plan
    monkeypatch.setattr(executors, "CHUNK_GROUPS", 2)
    opened, parent = tmp_path / "opened", os.getpid()
    real_open = plan.open_input

    def counting_open(recipe):
        if os.getpid() != parent:
            with open(opened, "a") as f:
                f.write(f"{os.getpid()}\n")
        return real_open(recipe)
    monkeypatch.setattr(plan, "open_input", counting_open)
    (tmp_path / "r.py").write_text('from surgeon.recipe import recipe, rescale\n'
                                   'RECIPE = recipe(ops=[rescale("*", factor=0.5, slots="follow")])\n')
    outs = {}
    for ex in ("local", "pool", "hdf5"):
        outs[ex] = tmp_path / f"{ex}.keras"
        if ex == "hdf5":
            _hdf5_only(monkeypatch)
        res = run_cli("apply", tmp_path / "r.py", "-i", fixture("cnn_adam.keras"), "-o", outs[ex],
                      "--executor", "pool" if ex == "pool" else "local", "--no-progress",
                      *(["--workers", "2"] if ex == "pool" else []))
        assert res.exit_code == 0, res.output
    import zipfile
    with zipfile.ZipFile(outs["local"]) as za, zipfile.ZipFile(outs["pool"]) as zb, \
            zipfile.ZipFile(outs["hdf5"]) as zc:
        assert za.namelist() == zb.namelist() == zc.namelist()
        differ = [n for n in za.namelist() if za.read(n) != zb.read(n)]
        assert differ == ["surgeon/provenance.json"]
        assert [n for n in za.namelist() if za.read(n) != zc.read(n)] == differ
        la, lb = (json.loads(z.read(differ[0]))[-1] for z in (za, zb))
    assert la["executor"]["name"] == "local" and la["executor"]["tasks"] == 1
    assert lb["executor"] | {"hosts": None} == {"name": "pool", "workers": 2, "tasks": 6, "hosts": None}
    assert_same_record(la, lb, outs["local"], outs["pool"])
    if executors._mp_context().get_start_method() == "fork":  # (forkserver once TF is loaded)
        assert not opened.exists(), "pool workers re-opened and re-parsed the input"


@pytest.mark.parametrize("name", ["cnn_adam.keras", "cnn_adam.weights.h5", "cnn_adam_sharded.weights.json",
                                  "legacy/tfk_cnn_adam.h5"])
def test_raw_reads_are_hdf5_reads(name):
    """Plain datasets are read with preadv at their offset (in a .keras: inside the zip
    member; legacy H5 too), bypassing HDF5: every tensor's bytes, dtype and shape are h5py's."""
    from surgeon.formats import open_checkpoint
    from surgeon.formats.keras_h5 import to_numpy
    with open_checkpoint(fixture(name)) as r:
        entries = r.entries()
        assert all(r._root[e.key].raw for e in entries)  # the fast path is the one tested
        for e in entries:
            a, b = r.read(e.name), to_numpy(r._dataset(e.key), e.dtype == "bfloat16")
            assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), e.name


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


def _running(task=b"ray::shard_task"):
    """Pids of this session's Ray workers running ``task`` (descendants of this process:
    other sessions' clusters on the machine are left alone)."""
    def parent(pid):
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return 0
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        up = int(pid) if cmd.startswith(task) else 0
        while up > 1 and up != os.getpid():
            up = parent(up)
        if up == os.getpid():
            found.append(int(pid))
    return found


def _kill_one_task(stop, killed, task=b"ray::shard_task", running=1):
    """SIGKILL a Ray worker process running a shard task, once ``running`` of them run."""
    while not stop.is_set() and not killed:
        pids = _running(task)
        if len(pids) >= running:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
            return
        time.sleep(0.02)


def _run_with_kill(sharded, out, retries, running=1, pause=0.5):
    stop, killed = threading.Event(), []
    t = threading.Thread(target=_kill_one_task, args=(stop, killed, b"ray::shard_task", running))
    t.start()
    try:
        _apply(sharded, out, "ray", retries=retries, pause=pause, workers=2)
    finally:
        stop.set()
        t.join()
    assert killed, "no Ray task was seen running"


def test_ray_worker_killed_is_retried(sharded, local_out, ray_cluster):
    out = sharded / "ray_retry" / "o.weights.json"
    out.parent.mkdir()
    _run_with_kill(sharded, out, retries=3)
    assert_same_output(local_out, out, _names(local_out))


def test_ray_worker_killed_without_retry_leaves_nothing(sharded, ray_cluster, monkeypatch):
    """One task SIGKILLed while another is busy: one line naming the shard, nothing at the
    target, and the busy task cancelled *and waited for* before the temp directory goes
    (a task still running could write into it, or beside it, after its removal)."""
    import shutil
    from surgeon.core.errors import SurgeonError
    out = sharded / "ray_fail" / "o.weights.json"
    out.parent.mkdir()
    rmtree, busy = shutil.rmtree, []
    def watched(path, *a, **kw):  # noqa: E306
        if Path(path).parent == out.parent:
            busy.append(_running())
        return rmtree(path, *a, **kw)
    monkeypatch.setattr(shutil, "rmtree", watched)
    with pytest.raises(SurgeonError) as err:
        _run_with_kill(sharded, out, retries=0, running=2, pause=3.0)  # one killed, one busy
    assert busy == [[]], "a cancelled Ray task still ran when its temp directory was removed"
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


# -- TF bundles and Orbax on Ray: per-task shards, index/manifest written by the driver --------
PARTS_RECIPE = ('from surgeon.recipe import recipe, rescale\n'
                'RECIPE = recipe(ops=[rescale("{sel}", factor=0.5, slots="follow")]{extra})\n')
TF_INPUT = ROOT / "fixtures" / "tf" / "keras3_cnn_adam"  # Keras 3 model, tf.train.Checkpoint, 3 data files


def _apply_parts(tmp_path, inp, out, sel, executor=None, extra="", **kw):
    from surgeon.recipe import apply_overrides, load_recipe
    from surgeon.recipe.execute import apply
    from surgeon.recipe.executors import make_executor
    (tmp_path / "r.py").write_text(PARTS_RECIPE.format(sel=sel, extra=extra))
    rec = apply_overrides(load_recipe(str(tmp_path / "r.py")), input=str(inp), output=str(out))
    return apply(rec, executor=make_executor(executor, **kw) if executor else None)


def _tf_values(prefix_dir):
    import tensorflow as tf
    r = tf.train.load_checkpoint(str(prefix_dir))
    return {k: r.get_tensor(k) for k in r.get_variable_to_shape_map()}


def test_ray_tf_bundle_equals_local(tmp_path, ray_cluster):
    """A Keras-written TF checkpoint: 3 tasks each write a data file, the driver merges
    the index; TF reads the values the local executor writes (1 data file). One task (the
    default shard size): the same files, byte for byte."""
    _apply_parts(tmp_path, TF_INPUT, tmp_path / "local", "conv*")
    plan, stats = _apply_parts(tmp_path, TF_INPUT, tmp_path / "ray", "conv*", "ray",
                               shard_bytes=1500, workers=1)
    assert stats.tensors == 4 and stats.slots == 8
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == \
        ["checkpoint", *(f"ckpt-1.data-0000{k}-of-00003" for k in range(3)), "ckpt-1.index"]
    a, b = _tf_values(tmp_path / "local"), _tf_values(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) > 20
    for k in a:
        assert (a[k] == b[k]) if isinstance(a[k], bytes) else np.array_equal(a[k], b[k]), k
    src = _tf_values(TF_INPUT)
    edited = [k for k in a if not isinstance(a[k], bytes) and not np.array_equal(a[k], src[k])]
    assert len(edited) >= stats.tensors + stats.slots  # (a tensor may have several keys)
    _apply_parts(tmp_path, TF_INPUT, tmp_path / "ray1", "conv*", "ray", workers=1)
    files = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert sorted(p.name for p in (tmp_path / "ray1").iterdir()) == files
    for f in files:
        assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "ray1" / f).read_bytes(), f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "r.py", "ray", "ray1"]  # no temp left


@pytest.fixture(scope="module")
def orbax_in(sharded):
    """The tiny Keras model of ``sharded`` as an Orbax checkpoint (surgeon convert)."""
    pytest.importorskip("tensorstore")
    out = sharded / "tiny.orbax"
    assert run_cli("convert", sharded / "tiny.keras", out).exit_code == 0
    return out


def test_ray_orbax_equals_local(sharded, orbax_in, tmp_path, ray_cluster):
    """Orbax: each task writes its ocdbt.process_<k>/ database, the driver merges them into
    the root manifest as a multi-host Orbax save; Keras restores the same state as from
    the local executor's output; the surgery log says ray, the tasks and the hosts."""
    from conftest import load_keras_model
    reset = ', iteration="reset"'  # the counter is written by the task owning it
    _apply_parts(tmp_path, orbax_in, tmp_path / "local", "d*", extra=reset)
    _apply_parts(tmp_path, orbax_in, tmp_path / "ray", "d*", "ray", extra=reset, shard_bytes=600)
    step = next((tmp_path / "ray").iterdir())
    procs = sorted(p.name for p in (step / "pytree").glob("ocdbt.process_*"))
    assert len(procs) >= 3 and procs[0] == "ocdbt.process_0"
    info = _log(tmp_path / "ray")["executor"]
    assert info["name"] == "ray" and info["tasks"] == len(procs) and info["hosts"]
    assert_same_record(_log(tmp_path / "local"), _log(tmp_path / "ray"), tmp_path / "local", tmp_path / "ray")
    a, b = load_keras_model(tmp_path / "local"), load_keras_model(tmp_path / "ray")
    ref = load_keras_model(sharded / "tiny.keras")
    assert len(a.weights) == len(b.weights) == len(ref.weights)
    for va, vb, vr in zip(a.weights, b.weights, ref.weights):
        assert np.array_equal(np.asarray(va), np.asarray(vb)), va.path
        scale = 0.5 if va.path.startswith("d") else 1.0
        assert np.array_equal(np.asarray(va), np.asarray(vr) * np.float32(scale)), va.path
    for va, vb in zip(a.optimizer.variables, b.optimizer.variables):
        assert np.array_equal(np.asarray(va), np.asarray(vb)), va.path
    assert int(b.optimizer.iterations) == 0 < int(ref.optimizer.iterations)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "r.py", "ray"]  # no temp left


def test_ray_orbax_task_killed_leaves_nothing(orbax_in, tmp_path, ray_cluster):
    """An Orbax task SIGKILLed after its first write, without retries: one line naming the
    task, nothing at the target, no temp directory left (TF bundles share this path)."""
    from surgeon.core.errors import SurgeonError
    stop, killed = threading.Event(), []
    t = threading.Thread(target=_kill_one_task, args=(stop, killed, b"ray::part_task"))
    t.start()
    try:
        with pytest.raises(SurgeonError) as err:
            _apply_parts(tmp_path, orbax_in, tmp_path / "out", "d*", "ray", retries=0, pause=0.5,
                         shard_bytes=600, workers=1)
    finally:
        stop.set()
        t.join()
    assert killed, "no Ray task was seen running"
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("shard ") and " of out: " in msg and "nothing was written" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.py"]


def test_ray_orbax_standard_checkpointer_restores(tmp_path, ray_cluster):
    """A PyTree saved by Orbax' StandardCheckpointer (arrays in its ocdbt.process_0/):
    edited and cast on Ray in 3 tasks, StandardCheckpointer restores the local output's
    values and dtypes."""
    ocp = pytest.importorskip("orbax.checkpoint")
    tree = {"params": {"kernel": np.arange(600, dtype=np.float32).reshape(20, 30),
                       "bias": np.linspace(-1, 1, 30).astype(np.float32)},
            "mu": np.full((20, 30), 0.25, np.float32), "step": np.array(5, np.int32)}
    with ocp.StandardCheckpointer() as c:
        c.save(tmp_path / "in", tree)
    assert (tmp_path / "in" / "ocdbt.process_0").is_dir()
    from surgeon.recipe import apply_overrides, load_recipe
    from surgeon.recipe.execute import apply
    from surgeon.recipe.executors import make_executor
    (tmp_path / "r.toml").write_text('[[ops]]\nop = "rescale"\nselect = "params/kernel"\nfactor = 2.0\n'
                                     '[[ops]]\nop = "cast"\nselect = "mu"\ndtype = "float16"\n')
    got = {}
    for ex, kw in (("local", {}), ("ray", {"shard_bytes": 2000})):
        rec = apply_overrides(load_recipe(str(tmp_path / "r.toml")), input=str(tmp_path / "in"),
                              output=str(tmp_path / ex))
        apply(rec, executor=make_executor(ex, **kw))
        with ocp.StandardCheckpointer() as c:
            got[ex] = c.restore(tmp_path / ex)
    assert len(list((tmp_path / "ray").glob("ocdbt.process_*"))) == _log(tmp_path / "ray")["executor"]["tasks"] == 3
    assert np.array_equal(got["local"]["params"]["kernel"], tree["params"]["kernel"] * 2)
    assert got["local"]["mu"].dtype == np.float16
    for path in (("params", "kernel"), ("params", "bias"), ("mu",), ("step",)):
        a, b = got["local"], got["ray"]
        for k in path:
            a, b = a[k], b[k]
        assert a.dtype == b.dtype and np.array_equal(a, b), path


def test_ray_orbax_merge_equals_local(sharded, orbax_in, tmp_path, ray_cluster):
    """Issue 18's Orbax merge on Ray: two Orbax checkpoints (the model and a rescaled copy)
    merged linearly in several Ray tasks restore in Keras exactly as the local merge does,
    and the log names the executor and its tasks."""
    from conftest import load_keras_model
    from surgeon.recipe.executors import make_executor
    from surgeon.recipe.merging import merge_checkpoints
    _apply_parts(tmp_path, orbax_in, tmp_path / "b", "d*")  # the "fine-tune": d* halved
    models = [str(orbax_in), str(tmp_path / "b")]
    kw = dict(params={"weight": [0.25, 0.75]}, hash_inputs=False)
    merge_checkpoints(models, output=str(tmp_path / "local"), **kw)
    merge_checkpoints(models, output=str(tmp_path / "ray"), **kw,
                      executor=make_executor("ray", shard_bytes=600))
    step = next((tmp_path / "ray").iterdir())
    assert len(list((step / "pytree").glob("ocdbt.process_*"))) >= 2  # really split in tasks
    assert _log(tmp_path / "ray")["executor"]["name"] == "ray"
    a, b = load_keras_model(tmp_path / "local"), load_keras_model(tmp_path / "ray")
    ref = load_keras_model(sharded / "tiny.keras")
    for va, vb, vr in zip(a.weights, b.weights, ref.weights):
        assert np.array_equal(np.asarray(va), np.asarray(vb)), va.path
        want = np.asarray(vr) * np.float32(0.625 if va.path.startswith("d") else 1.0)
        np.testing.assert_allclose(np.asarray(va), want, rtol=1e-6, err_msg=va.path)
    for va, vb in zip(a.optimizer.variables, b.optimizer.variables):
        assert np.array_equal(np.asarray(va), np.asarray(vb)), va.path
