"""Fuzz: mutated and truncated real checkpoints end in a one-line SurgeonError or a correct read.

Every case runs in a child forked by a fork server (tests/fuzz_worker.py: a fresh
interpreter without TensorFlow, so forking is safe and cheap) so that a libhdf5 segfault, a
hang or a memory blow-up in one case is reported as that case's failure instead of killing
the test session. The child gets an address-space limit of the server's size + 1 GiB (a
declared shape larger than the file must be refused *before* allocating) and a wall-clock
watchdog. Hypothesis picks the fixture and the mutation (derandomized: the same cases every
run, so a failure reproduces; SURGEON_FUZZ_SEED=<n> explores other ones); ~1,100 cases.

Outcome rules for one case:
- ``surgeon.SurgeonError`` with a non-empty, single-line message: fine.
- a read: every listed tensor reads, with the listed shape and dtype; when the mutated
  bytes happen to equal the original, every value equals the original's.
- anything else (another exception type, a signal, a timeout, MemoryError): failure.
"""
import os
import shutil

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st

from conftest import FIXTURES, fixture
from fuzz_worker import ForkServer

CASE_TIMEOUT = 30.0  # seconds; generous because the CI machine is shared
SCALE = int(os.environ.get("SURGEON_FUZZ_SCALE", "1"))  # e.g. 20 for a deep nightly run
CASES = {k: v * SCALE for k, v in {"keras": 300, "weights": 300, "sharded": 160,
                                   "truncated": 160, "legacy": 160}.items()}
TF_CASES = 120 * SCALE  # TF bundles: one worker process (TensorFlow is not fork-safe)
SEED = os.environ.get("SURGEON_FUZZ_SEED")  # unset: derandomized, the same cases every run
# No shrinking: a failing mutation is already small, and shrinking can take minutes.
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True,
                phases=[Phase.explicit, Phase.generate], derandomize=SEED is None, database=None)
reseed = seed(int(SEED)) if SEED else (lambda test: test)  # noqa: E731

KERAS = ["cnn_adam.keras", "lstm_adam.keras", "nested_adamw.keras", "cnn_rmsprop.keras"]
WEIGHTS = ["cnn_adam.weights.h5", "lstm_adam.weights.h5", "nested_adagrad.weights.h5",
           "cnn_sgdm.weights.h5"]
LEGACY = ["legacy/k20_mlp_adam.h5", "legacy/k22_lstm_adam.h5", "legacy/k3_cnn_adam.h5",
          "legacy/tfk_cnn_adam.h5", "legacy/k20_weights_only.h5"]
SHARDED = ["cnn_adam_sharded.weights.json"] + [
    f"cnn_adam_sharded_{i:05d}.weights.h5" for i in range(5)]


_SERVER = []


@pytest.fixture(scope="module", autouse=True)
def _fork_server():
    yield
    while _SERVER:
        _SERVER.pop().close()


def run_isolated(fn, *args, timeout=CASE_TIMEOUT, original=None):
    """Run case ``fn`` (a name in ``fuzz_worker.CASES``) in a child forked by the fork server.

    Returns the child's string result, or ``CRASH ...`` describing what went wrong."""
    if not _SERVER:
        _SERVER.append(ForkServer())
    return _SERVER[0].run(fn, *args, timeout=timeout, original=original)


def _assert_outcome(out, case):
    assert not out.startswith("CRASH"), f"{case}: {out}"
    if out.startswith("surgeon "):
        msg = out[len("surgeon "):]
        assert msg.strip() and "\n" not in msg, f"{case}: not a one-line message: {msg!r}"
    else:
        assert out == "ok", f"{case}: {out}"


# -- mutations -----------------------------------------------------------------------------
def _mutation():
    pos = st.floats(0, 1, exclude_max=True)
    flips = st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=12)
    return st.one_of(
        st.tuples(st.just("flip"), flips),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("overwrite"), st.tuples(pos, st.binary(min_size=1, max_size=64))),
        st.tuples(st.just("zero"), st.tuples(pos, st.integers(1, 4096))),
        st.tuples(st.just("delete"), st.tuples(pos, st.integers(1, 512))),
        st.tuples(st.just("insert"), st.tuples(pos, st.binary(min_size=1, max_size=64))),
        # big-endian/large numbers where shapes and sizes live: 0xff runs
        st.tuples(st.just("ones"), st.tuples(pos, st.integers(1, 8))),
    )


def mutate(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    b = bytearray(data)
    n = len(b)
    if kind == "flip":
        for p, v in arg:
            b[int(p * n)] = v
    elif kind == "truncate":
        del b[int(arg * n):]
    elif kind == "overwrite":
        p, blob = int(arg[0] * n), arg[1]
        b[p:p + len(blob)] = blob
    elif kind == "zero":
        p = int(arg[0] * n)
        b[p:p + arg[1]] = bytes(len(b[p:p + arg[1]]))
    elif kind == "delete":
        p = int(arg[0] * n)
        del b[p:p + arg[1]]
    elif kind == "insert":
        p = int(arg[0] * n)
        b[p:p] = arg[1]
    elif kind == "ones":
        p = int(arg[0] * n)
        b[p:p + arg[1]] = b"\xff" * len(b[p:p + arg[1]])
    return bytes(b)


def _model_for(name):
    if name.endswith(".weights.h5") and not name.startswith("cnn_adam_sharded"):
        return fixture(name.replace(".weights.h5", ".keras"))
    if name.endswith(".weights.json"):
        return fixture("cnn_adam.keras")
    return None


def _fuzz_one(tmp_path, name, mutation, with_model=True, compare=True):
    """``compare``: when the mutated bytes equal the original, every value must equal too."""
    src = fixture(name)
    data = src.read_bytes()
    bad = mutate(data, mutation)
    path = tmp_path / src.name
    path.write_bytes(bad)
    model = _model_for(name) if with_model else None
    original = (name, src, model) if compare and bad == data else None
    out = run_isolated("check_read", path, model, None, original=original)
    _assert_outcome(out, f"{name} {mutation!r}")
    return out


@settings(FUZZ, max_examples=CASES["keras"])
@reseed
@given(name=st.sampled_from(KERAS), mutation=_mutation())
def test_fuzz_keras_zip(tmp_path_factory, name, mutation):
    tmp = tmp_path_factory.mktemp("fz")
    _fuzz_one(tmp, name, mutation)
    shutil.rmtree(tmp)


@settings(FUZZ, max_examples=CASES["weights"])
@reseed
@given(name=st.sampled_from(WEIGHTS), mutation=_mutation(), with_model=st.booleans())
def test_fuzz_weights_h5(tmp_path_factory, name, mutation, with_model):
    tmp = tmp_path_factory.mktemp("fz")
    _fuzz_one(tmp, name, mutation, with_model=with_model, compare=with_model)
    shutil.rmtree(tmp)


@settings(FUZZ, max_examples=CASES["sharded"])
@reseed
@given(which=st.sampled_from(SHARDED), mutation=_mutation())
def test_fuzz_sharded(tmp_path_factory, which, mutation):
    """Mutate the index or one shard; the other files are intact copies."""
    tmp = tmp_path_factory.mktemp("fz")
    for n in SHARDED:
        shutil.copy(fixture(n), tmp / n)
    data = fixture(which).read_bytes()
    bad = mutate(data, mutation)
    (tmp / which).write_bytes(bad)
    original = (SHARDED[0], fixture(SHARDED[0]), fixture("cnn_adam.keras")) if bad == data else None
    out = run_isolated("check_read", tmp / SHARDED[0], fixture("cnn_adam.keras"), None, original=original)
    _assert_outcome(out, f"{which} {mutation!r}")
    shutil.rmtree(tmp)


@settings(FUZZ, max_examples=CASES["legacy"])
@reseed
@given(name=st.sampled_from(LEGACY), mutation=_mutation())
def test_fuzz_legacy_h5(tmp_path_factory, name, mutation):
    tmp = tmp_path_factory.mktemp("fz")
    _fuzz_one(tmp, name, mutation)
    shutil.rmtree(tmp)


@settings(FUZZ, max_examples=CASES["truncated"])
@reseed
@given(name=st.sampled_from(KERAS + WEIGHTS), cut=st.floats(0, 1, exclude_max=True))
def test_fuzz_truncated(tmp_path_factory, name, cut):
    """A file cut anywhere (an interrupted download or copy) never reads as complete."""
    tmp = tmp_path_factory.mktemp("fz")
    out = _fuzz_one(tmp, name, ("truncate", cut), compare=False)
    assert out.startswith("surgeon "), f"{name} cut at {cut}: read a truncated file as complete"
    shutil.rmtree(tmp)


def test_declared_shape_larger_than_file_is_refused_before_allocating(tmp_path):
    """A dataset header claiming ~1 TB in a 40 kB file: refused without allocating."""
    import h5py
    src = fixture("cnn_adam.weights.h5")
    path = tmp_path / "huge.weights.h5"
    shutil.copy(src, path)
    with h5py.File(path, "r+") as f:
        key = "layers/dense/vars/0"
        del f[key]
        # chunked, unfilled: libhdf5 would happily hand back 2**38 fill values
        f.create_dataset(key, shape=(2**19, 2**19), dtype="float32", chunks=(64, 64))
    # no --model: with one, the shape's misfit with the model is reported first (also unread)
    out = run_isolated("check_read", path, None, None)
    assert out.startswith("surgeon "), out
    assert "declared shape (524288, 524288) needs 1099511627776 bytes" in out, out


def test_compressed_bomb_dataset_is_refused(tmp_path):
    """A gzip dataset whose declared size is > 2000x what it stores is refused unread."""
    import h5py
    path = tmp_path / "bomb.weights.h5"
    shutil.copy(fixture("cnn_adam.weights.h5"), path)
    with h5py.File(path, "r+") as f:
        key = "layers/dense/vars/0"
        del f[key]
        ds = f.create_dataset(key, shape=(2**14, 2**14), dtype="float32", chunks=(2**12, 2**12),
                              compression="gzip")
        ds[:2**12, :2**12] = 0.0  # one real chunk; the rest is "fill value"
    out = run_isolated("check_read", path, None, None)  # no --model: see above
    assert out.startswith("surgeon ") and "declared shape (16384, 16384)" in out, out


def test_harness_reports_crashes_and_hangs():
    """The isolation itself works: a segfault, a hang and a memory blow-up are caught."""
    assert run_isolated("segv") == "CRASH killed by signal 11"
    assert run_isolated("hang", timeout=0.5).startswith("CRASH timeout")
    out = run_isolated("oom")
    assert out.startswith("CRASH exception") and "MemoryError" in out, out


def test_case_count():
    """>= 1,000 fuzz cases per run."""
    assert sum(CASES.values()) + TF_CASES >= 1000, CASES


# -- TF bundles and Orbax checkpoints: one worker process each ---------------------------------
# A worker's script: its setup (sources ``srcs``, ``work``, ``n``, ``seed``, the mutations
# ``KINDS``, ``files_of(case)``, ``CHECK_DTYPE``) then these cases: one file of a copy of a
# source mutated, every tensor read back.
DIR_CASES = r"""
rng = random.Random(seed)
counts = {"ok": 0, "surgeon": 0}
for i in range(n):
    src = rng.choice(srcs)
    case = os.path.join(work, f"c{i}")
    shutil.copytree(src, case)
    victim = rng.choice(files_of(case))
    data = bytearray(open(victim, "rb").read())
    kind = rng.choice(KINDS)
    if kind == "delete":
        os.unlink(victim)
    else:
        if kind == "truncate":
            del data[rng.randrange(len(data) + 1):]
        elif data:
            for _ in range(rng.randint(1, 8)):
                p = rng.randrange(len(data))
                data[p] = {"flip": rng.randrange(256), "zero": 0, "ones": 255}[kind]
        open(victim, "wb").write(bytes(data))
    desc = f"case {i}: {src} {os.path.relpath(victim, case)} {kind}"
    print(desc, flush=True)
    try:
        with surgeon.open_checkpoint(case) as ck:
            for e in ck.entries():
                a = ck.read(e.name)
                assert tuple(a.shape) == tuple(e.shape), (e.name, a.shape, e.shape)
                if CHECK_DTYPE:
                    assert str(a.dtype) == e.dtype, (e.name, a.dtype, e.dtype)
        counts["ok"] += 1
    except surgeon.SurgeonError as exc:
        msg = str(exc)
        if not msg.strip() or chr(10) in msg:
            print(f"FAIL {desc}: not one line: {msg!r}", flush=True)
            sys.exit(1)
        counts["surgeon"] += 1
    except BaseException:
        print(f"FAIL {desc}: " + traceback.format_exc(), flush=True)
        sys.exit(1)
    shutil.rmtree(case)
print("DONE", counts, flush=True)
"""


def _run_worker(setup, args, timeout, **env):
    """Run ``setup`` + ``DIR_CASES`` in a fresh interpreter (argv: ``args`` then the seed)."""
    import subprocess
    import sys
    seed = int(SEED or 0)
    r = subprocess.run([sys.executable, "-c", setup + DIR_CASES, *map(str, args), str(seed)],
                       capture_output=True, text=True, env=dict(os.environ, **env), timeout=timeout)
    tail = r.stdout.strip().splitlines()[-30:]
    assert r.returncode == 0 and tail and tail[-1].startswith("DONE"), \
        f"seed {seed}, exit {r.returncode}:\n" + "\n".join(tail) + "\n" + r.stderr[-1500:]


TF_WORKER = r"""
import os, random, shutil, sys, traceback
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import surgeon
srcs, work, n, seed = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
KINDS, CHECK_DTYPE = ["flip", "truncate", "zero", "ones"], False
files_of = lambda case: sorted(os.path.join(case, f) for f in os.listdir(case) if f != "checkpoint")
"""


def test_fuzz_tf_bundles(tmp_path):
    """Mutated/truncated TF checkpoint bundles (index and data files). Needs TensorFlow."""
    pytest.importorskip("tensorflow")
    dirs = [str(FIXTURES / "tf" / d) for d in ("tf1_adam", "keras3_cnn_adam", "v1opt_adam")]
    dirs = [d for d in dirs if os.path.isdir(d)]
    if not dirs:
        pytest.skip("no TF bundle fixtures (fixtures/make_tf_fixtures.py)")
    _run_worker(TF_WORKER, [",".join(dirs), tmp_path, TF_CASES], 60 + 5 * TF_CASES,
                TF_CPP_MIN_LOG_LEVEL="3")


ORBAX_CASES = 60 * SCALE
ORBAX_WORKER = r"""
import os, random, shutil, sys, traceback
import numpy as np
work, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import orbax.checkpoint as ocp
r = np.random.default_rng(0)
tree = {"params": {"dense": {"kernel": r.standard_normal((24, 40), np.float32),
                             "bias": r.standard_normal(40).astype(np.float32)}},
        "opt": {"mu": r.standard_normal((24, 40), np.float32)}, "step": np.array(7, np.int64)}
srcs = [os.path.join(work, "ocdbt"), os.path.join(work, "zarr")]
with ocp.StandardCheckpointer() as c:
    c.save(srcs[0], tree)
c = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True))
c.save(srcs[1], args=ocp.args.PyTreeSave(tree))
c.close()
import surgeon
KINDS, CHECK_DTYPE = ["flip", "truncate", "zero", "ones", "delete"], True
files_of = lambda case: sorted(os.path.join(d, f) for d, _, fs in os.walk(case) for f in fs)
"""


def test_fuzz_orbax(tmp_path):
    """Mutated, truncated or deleted files of Orbax checkpoints (OCDBT and per-array zarr3)."""
    pytest.importorskip("orbax.checkpoint")
    _run_worker(ORBAX_WORKER, [tmp_path, ORBAX_CASES], 120 + 5 * ORBAX_CASES)
