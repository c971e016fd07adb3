"""Orbax checkpoints (issue 15): Keras' own ``OrbaxCheckpoint`` writes them, Keras reads back
what surgeon writes, and ``orbax.checkpoint`` restores plain PyTree checkpoints surgeon edited.

One tiny functional model (a Sequential's variable paths change when Keras rebuilds it from
its config, so Keras' own Orbax round trip of a Sequential loses every weight) is trained a
few steps with ``OrbaxCheckpoint`` (steps 4, 6, 8) and saved as ``.keras`` at the end.
"""
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("tensorstore")

from conftest import load_keras_model, run_cli  # noqa: E402
from test_hostile import ENV, one_line_error, run  # noqa: E402

STEPS = (4, 6, 8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import keras
    d = tmp_path_factory.mktemp("orbax")
    keras.utils.set_random_seed(1)
    i = keras.Input((16,))
    h = keras.layers.Dense(24, activation="relu", name="d1")(i)  # 1.5 KB kernel: not inlined
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(i, keras.layers.Dense(2, name="out")(h), name="fm")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
    r = np.random.RandomState(0)
    x, y = r.rand(32, 16).astype("float32"), r.rand(32, 2).astype("float32")
    cb = keras.callbacks.OrbaxCheckpoint(str(d / "ck"), save_freq=2, max_to_keep=3,
                                         save_on_background=False)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[cb], verbose=0)
    model.save(d / "m.keras")
    seq = keras.Sequential([keras.Input((16,)), keras.layers.Dense(3, name="s1", trainable=False),
                            keras.layers.Dense(2, name="s2")], name="seq")  # s1 frozen
    seq.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    cb = keras.callbacks.OrbaxCheckpoint(str(d / "seq_ck"), save_freq=4, save_on_background=False)
    seq.fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)
    seq.save(d / "seq.keras")
    return d


def all_variables(model):
    """Weights by path, optimizer variables by path without the optimizer's name (a
    skeleton built in this process may be called adam_1; Orbax matches within one file)."""
    out = {v.path: np.asarray(v) for v in model.weights}
    return out | {"optimizer/" + v.path.split("/", 1)[1]: np.asarray(v)
                  for v in model.optimizer.variables}


def assert_same_state(a, b):
    va, vb = all_variables(a), all_variables(b)
    assert sorted(va) == sorted(vb)
    for k in va:
        assert va[k].dtype == vb[k].dtype and np.array_equal(va[k], vb[k]), k


def recipe(tmp_path, body):
    p = tmp_path / "r.toml"
    p.write_text(body)
    return p


# -- reading --------------------------------------------------------------------------------
def test_keras_checkpoint_lists_like_its_keras_file(trained):
    from surgeon.formats import open_checkpoint
    from surgeon.core.tree import is_metric
    with open_checkpoint(trained / "m.keras") as k, open_checkpoint(trained / "ck") as o:
        ke = {e.name: (e.shape, e.dtype, e.role, e.slot_of, e.slot) for e in k.entries()}
        oe = {e.name: (e.shape, e.dtype, e.role, e.slot_of, e.slot) for e in o.entries()
              if not is_metric(e)}
        metrics = [e for e in o.entries() if is_metric(e)]
        assert o.metadata()["step"] == 8 and o.optimizer.iterations == 8
        assert o.optimizer.class_name == "Adam"
    assert oe == ke
    assert {m.name for m in metrics} == {f"metrics_variables/{m}/{v}" for m in ("loss", "mean_absolute_error")
                                         for v in ("count", "total")}
    assert all(m.role == "state" for m in metrics)


def test_sequential_names_drop_the_model_name_keras_puts_in_front(trained, tmp_path):
    """A Sequential's state tree says seq/s2/kernel, seq_s2_kernel_momentum: the canonical
    names are its .keras names (and Keras 3.15 itself cannot load this checkpoint back).
    Its frozen layer s1 is stored under non_trainable_variables: frozen params, as in .keras."""
    from surgeon.core.tree import is_metric
    from surgeon.formats import open_checkpoint
    with open_checkpoint(trained / "seq.keras") as k, open_checkpoint(trained / "seq_ck") as o:
        ke = {e.name: (e.role, e.frozen, e.slot_of) for e in k.entries()}
        oe = {e.name: (e.role, e.frozen, e.slot_of) for e in o.entries() if not is_metric(e)}
    assert oe == ke and ke["s1/kernel"] == ("param", True, None), oe
    r = run_cli("ls", trained / "seq_ck")
    assert r.exit_code == 0 and "frozen" in r.output, r.output
    r = run_cli("diff", trained / "seq.keras", trained / "seq_ck")
    assert r.exit_code == 0 and r.output.startswith("equal: 8 tensors"), r.output
    r = run_cli("convert", trained / "seq_ck", tmp_path / "seq.keras")
    assert r.exit_code == 0, r.output
    assert_same_state(load_keras_model(trained / "seq.keras"), load_keras_model(tmp_path / "seq.keras"))


def test_step_option_and_latest(trained):
    r = run_cli("ls", trained / "ck", "--step", 6, "--json")
    assert r.exit_code == 0, r.output
    assert '"iterations": 6' in r.output
    r = run_cli("ls", trained / "ck", "--step", 5)
    assert r.exit_code == 2 and "no step 5; steps: 4, 6, 8" in r.output


def test_step_option_on_diff_audit_apply(trained, tmp_path):
    """--step N reads an Orbax root at step N on every command (the latest without it)."""
    r = run_cli("diff", trained / "ck" / "6", trained / "ck")
    assert r.exit_code == 1, r.output
    r = run_cli("diff", trained / "ck" / "6", trained / "ck", "--step", 6)
    assert r.exit_code == 0 and r.output.startswith("equal: 26 tensors"), r.output
    r = run_cli("audit", trained / "ck", "--step", 5)
    assert r.exit_code == 2 and "no step 5; steps: 4, 6, 8" in r.output, r.output
    out = tmp_path / "out"
    body = f'input = "{trained / "ck"}"\noutput = "{out}"\n[[ops]]\nop = "rescale"\nselect = "d1/kernel"\nfactor = 1.0\n'
    r = run_cli("apply", recipe(tmp_path, body), "--no-progress", "--step", 6)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["6"]  # a root in, a root out, at step 6
    r = run_cli("diff", trained / "ck" / "6", out)
    assert r.exit_code == 0 and r.output.startswith("equal: 26 tensors"), r.output
    r = run_cli("diff", trained / "m.keras", trained / "ck" / "8", "--step", 8)
    assert r.exit_code == 2 and "no input is an Orbax root" in r.output, r.output


def test_diff_keras_file_and_orbax_step_equal(trained):
    r = run_cli("diff", trained / "m.keras", trained / "ck" / "8")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("equal: 22 tensors compared")
    r = run_cli("diff", trained / "ck" / "6", trained / "ck" / "8")
    assert "different" in r.output and "metrics_variables" in r.output
    r = run_cli("audit", trained / "ck")
    assert r.exit_code == 0 and "healthy, no findings (26 tensors checked)" in r.output, r.output


def test_listing_imports_neither_tensorflow_nor_jax(trained):
    code = ("import sys; from surgeon.cli import main\n"
            "try: main(['ls', sys.argv[1]])\nexcept SystemExit: pass\n"
            "print('LOADED', [m for m in ('tensorflow', 'jax', 'orbax') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(trained / "ck")], capture_output=True,
                         text=True, env=ENV).stdout
    assert "LOADED []" in out, out[-500:]


RSS_AFTER_FREE = """
import sys, numpy as np
def rss():
    return next(int(l.split()[1]) >> 10 for l in open('/proc/self/status') if l.startswith('VmRSS'))
if sys.argv[2] == 'open':
    from surgeon.formats import open_checkpoint
    open_checkpoint(sys.argv[1]).close()
base = rss()
for _ in range(3):  # an array read, then freed, three times (16 MB)
    a = np.ones(1 << 22, np.float32)
    del a
print(rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc behaviour")
def test_freed_array_buffers_go_back_to_the_os(trained):
    """Peak RSS of a streaming copy stays at one array: once a reader is open, a freed
    16 MB buffer is returned (glibc would otherwise raise its mmap threshold after the
    first free and keep later buffers in its heaps: +16 MB per few arrays at 1 GB)."""
    def growth(mode):
        r = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE, str(trained / "ck"), mode],
                           capture_output=True, text=True, env=ENV)
        return int(r.stdout.strip().splitlines()[-1])
    assert growth("open") < 8
    assert growth("plain") >= 12  # the test sees the difference glibc makes


def test_without_the_extra_one_line_says_what_to_install(trained):
    code = ("import sys; sys.modules['tensorstore'] = None\n"
            "from surgeon.cli import main; main(['ls', sys.argv[1]])")
    r = subprocess.run([sys.executable, "-c", code, str(trained / "ck")], capture_output=True,
                       text=True, env=ENV)
    assert "pip install 'surgeon[orbax]'" in one_line_error(r)


# -- writing: Keras is the oracle --------------------------------------------------------------
def test_identity_apply_keras_loads_bit_identical_and_keeps_training(trained, tmp_path):
    out = tmp_path / "out"
    body = f'input = "{trained / "ck"}"\noutput = "{out}"\n[[ops]]\nop = "rescale"\nselect = "d1/kernel"\nfactor = 1.0\n'
    r = run_cli("apply", recipe(tmp_path, body), "--no-progress")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["8"]
    log = run_cli("log", out)
    assert log.exit_code == 0 and "rescale: 1 tensor(s)" in log.output, log.output
    ref = load_keras_model(trained / "ck")  # Keras ignores the surgery log beside its items
    got = load_keras_model(out)
    assert_same_state(ref, got)
    assert_same_state(load_keras_model(trained / "m.keras"), got)
    assert int(got.optimizer.iterations) == 8
    got.fit(np.ones((8, 16), "float32"), np.ones((8, 2), "float32"), batch_size=8, verbose=0)
    assert int(got.optimizer.iterations) == 9
    into = load_keras_model(trained / "m.keras")  # load_weights (Keras 3.15 takes roots only)
    for v in into.weights:
        v.assign(np.zeros(v.shape, v.dtype))
    into.load_weights(str(out))
    assert_same_state(ref, into)


def test_edit_lands_where_keras_reads_it(trained, tmp_path):
    (tmp_path / "root").mkdir()  # a step directory in, a step directory out
    out = tmp_path / "root" / "6"
    body = (f'input = "{trained / "ck" / "6"}"\noutput = "{out}"\n'
            '[[ops]]\nop = "rescale"\nselect = "d1/kernel"\nfactor = 2.0\nslots = "keep"\n')
    r = run_cli("apply", recipe(tmp_path, body), "--no-progress")
    assert r.exit_code == 0, r.output
    ref = load_keras_model(trained / "m.keras")
    shutil.copytree(trained / "ck" / "6", tmp_path / "ref" / "6")
    ref.load_weights(str(tmp_path / "ref"))  # Keras 3.15's load_weights takes roots only
    got = load_keras_model(trained / "m.keras")
    got.load_weights(str(tmp_path / "root"))
    assert int(got.optimizer.iterations) == 6
    a, b = all_variables(ref), all_variables(got)
    for k in a:
        want = a[k] * 2 if k == "d1/kernel" else a[k]
        assert np.array_equal(b[k], want), k


def test_values_equal_to_the_fill_value_are_stored(trained, tmp_path):
    """The iteration reset to 0 (zarr's fill value): the chunk is still written, as Orbax
    writes it (Keras refuses an array whose chunk is missing)."""
    out = tmp_path / "out"
    body = (f'input = "{trained / "ck"}"\noutput = "{out}"\niteration = "reset"\n'
            '[[ops]]\nop = "rescale"\nselect = "d1/kernel"\nfactor = 2.0\nslots = "keep"\n')
    r = run_cli("apply", recipe(tmp_path, body), "--no-progress")
    assert r.exit_code == 0, r.output
    got = load_keras_model(out)
    assert int(got.optimizer.iterations) == 0
    ref = all_variables(load_keras_model(trained / "ck"))
    for k, v in all_variables(got).items():
        if k != "optimizer/iteration":
            assert np.array_equal(v, ref[k] * 2 if k == "d1/kernel" else ref[k]), k


def test_keras_to_orbax_to_keras_bit_identical(trained, tmp_path):
    mid, back = tmp_path / "m.orbax", tmp_path / "back.keras"
    assert run_cli("convert", trained / "m.keras", mid).exit_code == 0
    assert sorted(p.name for p in mid.iterdir()) == ["8"]  # the step is the iteration
    r = run_cli("convert", mid, back)
    assert r.exit_code == 0, r.output
    for pair in ((trained / "m.keras", mid), (trained / "m.keras", back)):
        r = run_cli("diff", *pair)
        assert r.exit_code == 0 and r.output.startswith("equal: 22 tensors"), r.output
    ref = load_keras_model(trained / "m.keras")
    assert_same_state(ref, load_keras_model(mid))
    assert_same_state(ref, load_keras_model(back))


def test_transplant_into_an_orbax_checkpoint(trained, tmp_path):
    (tmp_path / "root").mkdir()
    r = run_cli("transplant", trained / "m.keras", trained / "ck" / "4", "-o",
                tmp_path / "root" / "4", "--layers", "d1")
    assert r.exit_code == 0, r.output
    got = load_keras_model(trained / "m.keras")
    got.load_weights(str(tmp_path / "root"))
    old = load_keras_model(trained / "m.keras")
    shutil.copytree(trained / "ck" / "4", tmp_path / "old" / "4")
    old.load_weights(str(tmp_path / "old"))
    full = all_variables(load_keras_model(trained / "m.keras"))
    a, b = all_variables(old), all_variables(got)
    for k in b:
        moved = k.startswith(("d1/", "optimizer/d1_"))
        assert np.array_equal(b[k], full[k] if moved else a[k]), k


def test_resume_from_orbax_writes_orbax_named_by_the_new_step(trained, tmp_path):
    data = tmp_path / "data.py"
    data.write_text("import numpy as np\ndef d():\n    r = np.random.RandomState(0)\n"
                    "    return r.rand(16, 16).astype('float32'), r.rand(16, 2).astype('float32')\n")
    r = run_cli("resume", trained / "ck", "--data", f"{data}:d", "--steps", 2, "--batch-size", 8,
                "-o", tmp_path / "res")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["10"]
    assert int(load_keras_model(tmp_path / "res").optimizer.iterations) == 10


# -- damaged input ----------------------------------------------------------------------------
def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


DAMAGE = {
    "missing ocdbt.process_0": (lambda s: shutil.rmtree(s / "pytree" / "ocdbt.process_0"),
                                "ocdbt.process_0/ is missing"),
    "truncated manifest": (lambda s: _truncate(s / "pytree" / "manifest.ocdbt"),
                           "damaged OCDBT manifest"),
    "step without its metadata": (lambda s: (s / "_CHECKPOINT_METADATA").unlink(),
                                  "step directory without its _CHECKPOINT_METADATA"),
    "item without its metadata": (lambda s: (s / "pytree" / "_METADATA").unlink(),
                                  "PyTree item without its _METADATA"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_one_line_exit_2(trained, tmp_path, case):
    step = tmp_path / "8"
    shutil.copytree(trained / "ck" / "8", step)
    damage, said = DAMAGE[case]
    damage(step)
    r = run_cli("ls", step)
    assert r.exit_code == 2 and said in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_damaged_checkpoint_cli_subprocess(trained, tmp_path):
    step = tmp_path / "8"
    shutil.copytree(trained / "ck" / "8", step)
    shutil.rmtree(step / "pytree" / "ocdbt.process_0")
    assert "ocdbt.process_0/ is missing" in one_line_error(run("diff", trained / "m.keras", step))


def test_existing_output_refused_and_nothing_written(trained, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep").write_text("x")
    body = f'input = "{trained / "ck"}"\noutput = "{out}"\n[[ops]]\nop = "rescale"\nselect = "d1/kernel"\nfactor = 2.0\n'
    r = run_cli("apply", recipe(tmp_path, body), "--no-progress")
    assert r.exit_code == 2 and "exists" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml", "taken"]


# -- storage paths: TensorStore kvstore URLs (gs://, s3://, file://, memory://) ------------------
def test_memory_url_read_edit_write_through_the_library_api(trained, tmp_path):
    """memory:// (TensorStore's in-process kvstore) stands in for an object store: read,
    edited into a new URL, published by Orbax's commit marker, written back locally."""
    import surgeon
    from surgeon.formats import open_checkpoint, open_writer
    from surgeon.formats.orbax_kv import COMMIT, KvPath
    from surgeon.recipe import apply_overrides
    a, b, back = "memory://t15/a", "memory://t15/b", tmp_path / "back"
    rec = surgeon.load_recipe(recipe(tmp_path, f'input = "{trained / "ck"}"\noutput = "{a}"\n[[ops]]\n'
                                     'op = "rescale"\nselect = "d1/kernel"\nfactor = 2.0\n'))
    surgeon.apply(rec)
    assert (KvPath(a) / "8" / COMMIT).is_file()
    surgeon.apply(apply_overrides(rec, input=a, output=b))
    surgeon.apply(apply_overrides(rec, input=b, output=str(back)))
    with open_checkpoint(trained / "ck") as src, open_checkpoint(b) as mid, open_checkpoint(back) as out:
        assert mid.metadata()["step"] == 8 and len(out.entries()) == len(src.entries()) == 26
        for e in src.entries():
            want = src.read(e.name) * (8 if e.name == "d1/kernel" else 1)
            assert np.array_equal(out.read(e.name), want) and np.array_equal(mid.read(e.name), want / (
                2 if e.name == "d1/kernel" else 1)), e.name
    with pytest.raises(surgeon.SurgeonError, match="exists"):  # never onto an existing target
        surgeon.apply(apply_overrides(rec, input=a, output=b))
    with open_checkpoint(a) as r:  # an interrupted write is not a checkpoint: no marker
        w = open_writer("memory://t15/c", like=r)
        w.write("d1/kernel", r.read("d1/kernel"))
        assert not (KvPath("memory://t15/c") / "8" / COMMIT).is_file()
        with pytest.raises(surgeon.SurgeonError, match="no commit_success.txt"):
            open_checkpoint("memory://t15/c/8")
        w.abort()
    assert not KvPath("memory://t15/c").exists()
    (KvPath(b) / "8" / COMMIT).unlink()
    with pytest.raises(surgeon.SurgeonError, match="incomplete Orbax checkpoint: no commit_success.txt"):
        open_checkpoint(b)


def test_file_url_through_the_cli_keras_loads_it(trained, tmp_path):
    out = tmp_path / "out"
    body = f'input = "{trained / "ck"}"\noutput = "file://{out}"\n[[ops]]\nop = "rescale"\nselect = "d1/kernel"\nfactor = 1.0\n'
    r = run("apply", recipe(tmp_path, body), "--no-progress", "--step", 6)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["6"] and (out / "6" / "commit_success.txt").is_file()
    r = run_cli("diff", trained / "ck" / "6", f"file://{out}")
    assert r.exit_code == 0 and r.output.startswith("equal: 26 tensors"), r.output
    r = run_cli("convert", f"file://{out}", tmp_path / "back.keras")  # a URL source too
    assert r.exit_code == 0, r.output
    r = run_cli("diff", trained / "ck" / "6", tmp_path / "back.keras")
    assert r.exit_code == 0 and r.output.startswith("equal: 22 tensors"), r.output
    got = load_keras_model(out)  # Keras reads it (step 6's values: surgeon diff above)
    assert int(got.optimizer.iterations) == 6
    from surgeon.formats import open_checkpoint
    with open_checkpoint(trained / "ck" / "6") as r:
        assert np.array_equal(got.get_layer("d1").kernel, r.read("d1/kernel"))


def test_bucket_without_credentials_one_line_exit_2(tmp_path):
    """Offline and without credentials, gs:// fails in seconds (few retries), one line."""
    r = subprocess.run([sys.executable, "-m", "surgeon", "ls", "gs://surgeon-test-no-such-bucket/ck"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert "gs://surgeon-test-no-such-bucket/ck" in one_line_error(r)


# -- plain PyTree checkpoints (JAX/Flax users write them with orbax directly) -----------------
def _plain_tree():
    import ml_dtypes
    return {"params": {"dense": {"kernel": np.arange(600, dtype=np.float32).reshape(20, 30),
                                 "bias": np.linspace(-1, 1, 30).astype(np.float32)}},
            "opt_state": {"mu": np.full((20, 30), 0.25, np.float32)},
            "step": np.array(5, np.int32), "half": np.ones(4, ml_dtypes.bfloat16)}


def _save_plain(kind, path, tree):
    import orbax.checkpoint as ocp
    if kind == "standard":
        with ocp.StandardCheckpointer() as c:
            c.save(path, tree)
    elif kind == "zarr":  # one zarr (v2) directory per array, no OCDBT
        c = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False))
        c.save(path, args=ocp.args.PyTreeSave(tree))
        c.close()
    else:
        with ocp.CheckpointManager(path) as m:
            for step in (3, 7):
                m.save(step, args=ocp.args.StandardSave(tree))
            m.wait_until_finished()


def _restore_plain(kind, path):
    import orbax.checkpoint as ocp
    if kind == "standard":
        with ocp.StandardCheckpointer() as c:
            return c.restore(path)
    if kind == "zarr":
        return ocp.PyTreeCheckpointer().restore(path)
    with ocp.CheckpointManager(path) as m:
        assert m.all_steps() == [7]
        return m.restore(7)


@pytest.mark.parametrize("kind", ["standard", "zarr", "manager"])
def test_plain_pytree_edit_and_cast_orbax_restores(tmp_path, kind):
    tree = _plain_tree()
    _save_plain(kind, tmp_path / "in", tree)
    from surgeon.formats import open_checkpoint
    with open_checkpoint(tmp_path / "in") as r:
        assert {e.name for e in r.entries()} == {"params/dense/kernel", "params/dense/bias",
                                                  "opt_state/mu", "step", "half"}
        assert np.array_equal(r.read("params/dense/kernel"), tree["params"]["dense"]["kernel"])
    body = (f'input = "{tmp_path / "in"}"\noutput = "{tmp_path / "out"}"\n'
            '[[ops]]\nop = "rescale"\nselect = "params/dense/kernel"\nfactor = 2.0\n'
            '[[ops]]\nop = "cast"\nselect = "opt_state/mu"\ndtype = "float16"\n')
    r = run_cli("apply", recipe(tmp_path, body), "--no-progress")
    assert r.exit_code == 0, r.output
    got = _restore_plain(kind, tmp_path / "out")
    assert np.array_equal(got["params"]["dense"]["kernel"], tree["params"]["dense"]["kernel"] * 2)
    assert got["opt_state"]["mu"].dtype == np.float16 and np.all(got["opt_state"]["mu"] == 0.25)
    for key in ("step", "half"):
        assert got[key].dtype == tree[key].dtype and np.array_equal(got[key], tree[key])
    assert np.array_equal(got["params"]["dense"]["bias"], tree["params"]["dense"]["bias"])


# -- two processes (jax.distributed on 127.0.0.1) ---------------------------------------------
def test_two_process_checkpoint_read_edited_restored_by_both(tmp_path):
    """Two processes save their shards (ocdbt.process_0/1); surgeon edits the checkpoint
    while they wait; both restore the output onto their devices and check their shards."""
    import socket
    from pathlib import Path
    src, out, go = tmp_path / "ck", tmp_path / "out", tmp_path / "go"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("orbax_two_process.py")
    procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), src, out, go],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
             for i in range(2)]
    try:
        for i, p in enumerate(procs):
            lines = []
            while not lines or lines[-1] != f"saved {i}\n":
                lines.append(p.stdout.readline())
                assert lines[-1] or p.poll() is None, "".join(lines)[-2000:]
        assert (src / "ocdbt.process_0").is_dir() and (src / "ocdbt.process_1").is_dir()
        body = f'input = "{src}"\noutput = "{out}"\n[[ops]]\nop = "rescale"\nselect = "w"\nfactor = 2.0\n'
        r = run_cli("apply", recipe(tmp_path, body), "--no-progress")
        assert r.exit_code == 0, r.output
    finally:
        go.touch()
    for i, p in enumerate(procs):
        rest = p.communicate(timeout=240)[0]
        assert p.returncode == 0 and f"restored {i}" in rest, rest[-2000:]
    shutil.rmtree(src / "ocdbt.process_1")
    r = run_cli("ls", src)
    assert r.exit_code == 2 and "ocdbt.process_1/ is missing" in r.output, r.output
