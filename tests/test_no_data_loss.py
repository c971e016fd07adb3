"""Nothing lost, nothing misleading: no command replaces its input; an output's name is its
format; outputs get cp's permissions; every output carries its surgery log; a --model that
does not fit is refused; optimizer state is dropped only when asked.

Every command of the CLI is classified below as writing or read-only, so that a new command
cannot escape these tests.
"""
import hashlib
import json
import os
import shutil
import stat
import zipfile

import pytest

from conftest import FIXTURES, ROOT, fixture, load_keras_model, run_cli
from surgeon.formats.provenance import input_digest

DATA = f"{ROOT / 'recipes' / 'example_data.py'}:cnn_data"
RECIPE = ROOT / "recipes" / "shrink_perturb.toml"
DROPOUT = '{"class_name": "Dropout", "config": {"rate": 0.1}}'
TANH = '{"class_name": "Dense", "config": {"units": 8, "activation": "tanh"}}'

# command -> (input fixture, argv for input i and output o)
WRITERS = {
    "apply": ("cnn_adam.keras", lambda i, o: ["apply", RECIPE, "-i", i, "-o", o, "--no-progress"]),
    "transplant": ("cnn_adam.keras", lambda i, o: ["transplant", fixture("cnn_sgdm.keras"), i,
                                                   "-o", o, "--layers", "conv1"]),
    "convert": ("cnn_adam.keras", lambda i, o: ["convert", i, o]),
    "resume": ("cnn_adam.keras", lambda i, o: ["resume", i, "--data", DATA, "--steps", "1",
                                               "-o", o]),
    "widen": ("mlp_adam.keras", lambda i, o: ["widen", i, "--layer", "fc1", "--to", "12", "-o", o]),
    "deepen": ("mlp_adam.keras", lambda i, o: ["deepen", i, "--after", "fc1", "-o", o]),
    "delete-channels": ("mlp_adam.keras", lambda i, o: ["delete-channels", i, "--layer", "fc1",
                                                        "--channels", "0,3", "-o", o]),
    "prune-channels": ("mlp_adam.keras", lambda i, o: ["prune-channels", i, "--layer", "fc1",
                                                       "--fraction", "0.25", "-o", o]),
    "delete-layer": ("mlp_adam.keras", lambda i, o: ["delete-layer", i, "--layer", "fc2", "-o", o]),
    "insert-layer": ("mlp_adam.keras", lambda i, o: ["insert-layer", i, "--after", "fc1",
                                                     "--layer-json", DROPOUT, "--name", "drop",
                                                     "-o", o]),
    "replace-layer": ("mlp_adam.keras", lambda i, o: ["replace-layer", i, "--layer", "fc2",
                                                      "--layer-json", TANH, "-o", o]),
    "diff": ("cnn_adam.keras", lambda i, o: ["diff", i, fixture("cnn_sgdm.keras"), "--plot", o]),
    "delete-heads": ("attn_adam.keras", lambda i, o: ["delete-heads", i, "--layer", "mha",
                                                      "--heads", "1", "-o", o]),
    "prune-heads": ("attn_adam.keras", lambda i, o: ["prune-heads", i, "--layer", "mha",
                                                     "--fraction", "0.34", "-o", o]),
    "merge": ("cnn_adam.keras", lambda i, o: ["merge", i, fixture("cnn_sgdm.keras"), "-o", o]),
}
READ_ONLY = {"ls", "log", "audit"}
# writers whose input must be built by the test (a LoRA model): their output rules are
# checked in tests/test_merge.py (test_lora_*), not in the matrix below
ELSEWHERE = {"lora"}
STRUCTURAL = ["widen", "deepen", "delete-channels", "prune-channels", "delete-layer",
              "insert-layer", "replace-layer", "delete-heads", "prune-heads"]
CHECKPOINT_WRITERS = [c for c in WRITERS if c != "diff"]  # diff writes a PNG, not a checkpoint


def _src(name):
    return FIXTURES / "structure" / name if name.startswith(("mlp", "attn")) else fixture(name)


def snapshot(folder):
    """Every file below ``folder`` (links as their targets) with its sha256."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for f in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, folder)
            out[rel] = os.readlink(p) if os.path.islink(p) else \
                hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_every_command_is_classified():
    """A new command must be added to WRITERS (and so to every test below) or READ_ONLY."""
    from surgeon.cli import main
    assert set(main.commands) == set(WRITERS) | READ_ONLY | ELSEWHERE, \
        sorted(set(main.commands) ^ (set(WRITERS) | READ_ONLY | ELSEWHERE))


# -- 1. no command replaces or modifies its input -------------------------------------------
def _alias(kind, work, inp, monkeypatch):
    """The input path as given and an output path that is the input under another name."""
    if kind == "same":
        return str(inp), str(inp)
    if kind == "dot":
        monkeypatch.chdir(work)
        return inp.name, f"./{inp.name}"
    if kind == "symlink":
        (work / f"link{inp.suffix}").symlink_to(inp)
        return str(inp), str(work / f"link{inp.suffix}")
    if kind == "hardlink":
        os.link(inp, work / f"hard{inp.suffix}")
        return str(inp), str(work / f"hard{inp.suffix}")
    if kind == "linked-dir":
        (work.parent / f"{work.name}-link").symlink_to(work)
        return str(inp), str(work.parent / f"{work.name}-link" / inp.name)
    assert kind == "directory"
    return str(inp), str(work)


@pytest.mark.parametrize("kind", ["same", "dot", "symlink", "hardlink", "linked-dir", "directory"])
@pytest.mark.parametrize("command", sorted(WRITERS))
def test_no_command_replaces_its_input(tmp_path, monkeypatch, command, kind):
    name, argv = WRITERS[command]
    work = tmp_path / "work"
    work.mkdir()
    inp = work / name
    shutil.copy(_src(name), inp)
    i, o = _alias(kind, work, inp, monkeypatch)
    before = snapshot(work)
    res = run_cli(*argv(i, o))
    assert res.exit_code == 2, (command, kind, res.output[-2000:])
    errors = [ln for ln in res.output.splitlines() if ln.startswith("surgeon: error: ")]
    usage = kind == "directory" and "is a directory" in res.output  # click: a file option
    assert usage or len(errors) == 1 and "output is the input" in errors[0], res.output[-2000:]
    assert snapshot(work) == before  # input byte-identical, nothing else written


@pytest.fixture(scope="module")
def tf_work(tmp_path_factory):
    work = tmp_path_factory.mktemp("tfwork")
    shutil.copytree(FIXTURES / "tf" / "keras3_cnn_adam", work / "ckdir")
    shutil.copytree(FIXTURES / "tf" / "module_savedmodel", work / "sm")
    (work / "linkdir").symlink_to(work / "ckdir")
    return work


@pytest.mark.parametrize("case", [
    ("apply", "ckdir", "ckdir"),  # the checkpoint directory itself
    ("apply", "ckdir", "ckdir/sub"),  # inside the input directory
    ("apply", "ckdir/ckpt-1", "linkdir/ckpt-1"),  # a prefix whose files are the input's
    ("apply", "ckdir/ckpt-1", "ckdir/ckpt-1.index"),
    ("apply", "sm", "sm"),  # a SavedModel directory
    ("convert", "ckdir", "ckdir/new.ckpt"),  # a new prefix inside the input directory
    ("convert", "sm", "sm/variables/variables"),
    ("convert", "ckdir/ckpt-1", "."),  # a directory holding the input
])
def test_tf_directories_and_prefixes_are_inputs_too(tf_work, monkeypatch, case):
    command, i, o = case
    monkeypatch.chdir(tf_work)
    before = snapshot(tf_work)
    argv = ["apply", RECIPE, "-i", i, "-o", o, "--no-progress"] if command == "apply" else \
        ["convert", i, o, "--like", fixture("cnn_adam.keras")]
    res = run_cli(*argv)
    assert res.exit_code == 2, res.output[-2000:]
    assert "output is the input" in res.output, res.output[-2000:]
    assert snapshot(tf_work) == before


def test_library_writer_refuses_an_open_input(tmp_path):
    """The guard is in the atomic write layer: a writer of any command refuses a target
    that is a checkpoint open for reading, even when the caller forgot to check."""
    from surgeon.core import atomic
    from surgeon.core.errors import WriteError
    from surgeon.formats import open_checkpoint
    src = tmp_path / "m.keras"
    shutil.copy(fixture("cnn_adam.keras"), src)
    (tmp_path / "alias.keras").symlink_to(src)
    before = snapshot(tmp_path)
    with open_checkpoint(src):
        for target in (src, tmp_path / "alias.keras", tmp_path):
            with pytest.raises(WriteError, match="output is the input"):
                atomic.temp_path(target)
    assert snapshot(tmp_path) == before
    atomic.discard(atomic.temp_path(src))  # closed: no longer an input of this process


# -- 2. the output's name decides its format ----------------------------------------------
@pytest.mark.parametrize("command,src,out", [
    ("apply", "cnn_adam.weights.h5", "o.keras"),
    ("apply", "cnn_adam.keras", "o.weights.h5"),
    ("apply", "cnn_adam.keras", "o.h5"),
    ("transplant", "cnn_adam.keras", "o.weights.h5"),
    ("widen", "mlp_adam.keras", "o.weights.h5"),
    ("deepen", "mlp_adam.keras", "o.h5"),
    ("resume", "cnn_adam.keras", "o.h5"),
    ("resume", "cnn_adam.keras", "o.weights.h5"),
    ("resume", "cnn_adam.weights.h5", "o.keras"),
])
def test_output_name_is_its_format(tmp_path, command, src, out):
    name = WRITERS[command][0] if command not in ("apply", "resume") else src
    argv = WRITERS[command][1](_src(name), tmp_path / out)
    if name.endswith(".weights.h5"):
        argv += ["--model", fixture("cnn_adam.keras")]
    res = run_cli(*argv)
    if res.exit_code == 0:  # written in the named format: Keras loads it as such
        if out.endswith(".keras"):
            load_keras_model(tmp_path / out)
        else:
            load_keras_model(tmp_path / out, weights_of=fixture("cnn_adam.keras"))
        return
    assert res.exit_code == 2, res.output[-2000:]
    assert "surgeon convert" in res.output and "the name says" in res.output, res.output[-2000:]
    assert os.listdir(tmp_path) == []


# -- 3. permissions, 4. surgery log -----------------------------------------------------------
@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every checkpoint writer run once under umask 027 on inputs that carry a surgery log."""
    work = tmp_path_factory.mktemp("written")
    bases = {}
    for name in ("cnn_adam.keras", "mlp_adam.keras", "attn_adam.keras"):
        base = work / f"base_{name}"
        res = run_cli("apply", RECIPE, "-i", _src(name), "-o", base, "--no-progress")
        assert res.exit_code == 0, res.output
        bases[name] = base
    old = os.umask(0o027)
    try:
        outs = {}
        for command in CHECKPOINT_WRITERS:
            name, argv = WRITERS[command]
            out = work / f"{command}.{'h5' if command == 'convert' else 'keras'}"
            res = run_cli(*argv(bases[name], out))
            assert res.exit_code == 0, (command, res.output[-3000:])
            outs[command] = (bases[name], out)
    finally:
        os.umask(old)
    return outs


def _log(path):
    from surgeon.formats.provenance import read_log
    return read_log(path)


@pytest.mark.parametrize("command", CHECKPOINT_WRITERS)
def test_outputs_get_the_mode_cp_gives(written, command):
    _, out = written[command]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640, oct(os.stat(out).st_mode)


@pytest.mark.parametrize("command", CHECKPOINT_WRITERS)
def test_every_output_carries_its_surgery_log(written, command):
    base, out = written[command]
    history, before = _log(out), _log(base)
    assert len(before) == 1 and before[0]["command"] == "apply"
    assert history[:-1] == before, "the input's history is kept, in order"
    last = history[-1]
    assert last["command"] == command
    assert last["inputs"][0]["path"] == str(base) and len(input_digest(last["inputs"][0])[1]) == 64
    res = run_cli("log", out)
    said = str(RECIPE) if command == "apply" else f"surgeon {command}"
    headers = [ln for ln in res.output.splitlines() if ln.startswith("#")]
    assert res.exit_code == 0 and len(headers) == 2 and said in headers[-1], res.output


@pytest.mark.parametrize("umask,mode", [(0o002, 0o664), (0o077, 0o600)])
def test_modes_follow_the_umask_and_an_existing_target_keeps_its_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        patched, rebuilt = tmp_path / "p.keras", tmp_path / "r.keras"
        res = run_cli("apply", RECIPE, "-i", fixture("cnn_adam.keras"), "-o", patched, "--no-progress")
        assert res.exit_code == 0, res.output
        res = run_cli("widen", FIXTURES / "structure" / "mlp_adam.keras", "--layer", "fc1",
                      "--to", "12", "-o", rebuilt)
        assert res.exit_code == 0, res.output
        for p in (patched, rebuilt):
            assert stat.S_IMODE(os.stat(p).st_mode) == mode, (p, oct(os.stat(p).st_mode))
        os.chmod(patched, 0o604)  # like cp onto an existing file: its mode stays
        res = run_cli("apply", RECIPE, "-i", fixture("cnn_adam.keras"), "-o", patched, "--no-progress")
        assert res.exit_code == 0, res.output
        assert stat.S_IMODE(os.stat(patched).st_mode) == 0o604
    finally:
        os.umask(old)


# -- 5. a --model that does not fit is an error ---------------------------------------------
MISFITS = {  # model -> what the message names
    "structure/mlp_adam.keras": "the weights hold a layer",  # other layer names
    "recipe/cnn5_fresh.keras": "units=5",  # same names, another head shape
}


@pytest.fixture(scope="module")
def mlp_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    with zipfile.ZipFile(FIXTURES / "structure" / "mlp_adam.keras") as zf:
        path.write_bytes(zf.read("config.json"))
    return path


@pytest.mark.parametrize("model", list(MISFITS) + ["config.json"])
@pytest.mark.parametrize("command", ["ls", "diff", "audit", "apply", "convert"])
def test_model_that_does_not_fit_is_an_error(tmp_path, mlp_config, command, model):
    weights = fixture("cnn_adam.weights.h5")
    mpath = mlp_config if model == "config.json" else FIXTURES / model
    argv = {"ls": ["ls", weights],
            "diff": ["diff", weights, fixture("cnn_adam.keras")],
            "audit": ["audit", weights],
            "apply": ["apply", RECIPE, "-i", weights, "-o", tmp_path / "o.weights.h5", "--no-progress"],
            "convert": ["convert", weights, tmp_path / "o.keras"]}[command]
    res = run_cli(*argv, "--model", mpath)
    assert res.exit_code == 2, res.output[-2000:]
    line = [ln for ln in res.output.splitlines() if ln.startswith("surgeon: error: ")]
    assert len(line) == 1 and "does not fit these weights" in line[0], res.output[-2000:]
    assert MISFITS.get(model, "the weights hold a layer") in line[0], line[0]
    assert os.listdir(tmp_path) == []


def test_legacy_weights_with_a_model_that_does_not_fit(tmp_path):
    res = run_cli("ls", FIXTURES / "legacy" / "k20_weights_only.h5", "--model", fixture("cnn_adam.keras"))
    assert res.exit_code == 2 and "does not fit these weights" in res.output, res.output


def test_model_that_fits_still_binds_every_slot():
    res = run_cli("ls", fixture("cnn_adam.weights.h5"), "--model", fixture("cnn_adam.keras"), "--json")
    assert res.exit_code == 0, res.output
    names = [e["name"] for e in json.loads(res.output)["entries"]]
    assert not [n for n in names if "unresolved" in n]


# -- 6. optimizer state is dropped only when asked ------------------------------------------
@pytest.fixture(scope="module")
def unbindable(tmp_path_factory):
    """A legacy H5 whose Adam state (one weight short) fits no known layout: unmovable."""
    import h5py
    import numpy as np
    bad = tmp_path_factory.mktemp("unbindable") / "bad.h5"
    shutil.copy(FIXTURES / "legacy" / "k20_mlp_adam.h5", bad)
    with h5py.File(bad, "a") as f:
        og = f["optimizer_weights"]
        names = list(og.attrs["weight_names"])
        del og[names[-1].decode()]
        og.attrs["weight_names"] = np.array(names[:-1])
    return bad


def test_convert_refuses_to_drop_optimizer_state_it_cannot_move(unbindable, tmp_path):
    res = run_cli("convert", unbindable, tmp_path / "o.keras")
    assert res.exit_code == 2, res.output[-2000:]
    assert "cannot move the optimizer state: 11 of its 11 slot(s)" in res.output
    assert "--optimizer drop" in res.output
    assert os.listdir(tmp_path) == []


def test_convert_drops_optimizer_state_when_asked(unbindable, tmp_path):
    res = run_cli("convert", unbindable, tmp_path / "o.keras", "--optimizer", "drop")
    assert res.exit_code == 0, res.output[-2000:]
    assert "optimizer state dropped (--optimizer drop)" in res.output
    model = load_keras_model(tmp_path / "o.keras")
    from surgeon import open_checkpoint
    assert getattr(model, "optimizer", None) is None  # nothing carried over: a fresh start
    with open_checkpoint(unbindable) as src:
        for v in model.weights:
            assert (src.read(v.path) == v.numpy()).all(), v.path


def test_refused_before_any_work(tmp_path):
    """Every writer refuses before loading TensorFlow, reading tensors or writing anything."""
    import subprocess
    import sys
    cases = []
    for command, (name, argv) in WRITERS.items():
        inp = tmp_path / f"{command}-{name}"
        shutil.copy(_src(name), inp)
        cases.append([str(a) for a in argv(inp, inp)])
    before = snapshot(tmp_path)
    script = (
        "import json, sys\n"
        "from surgeon.cli import main\n"
        "codes = []\n"
        f"for argv in {json.dumps(cases)}:\n"
        "    try:\n"
        "        main.main(argv, standalone_mode=False)\n"
        "    except SystemExit as exc:\n"
        "        codes.append(exc.code)\n"
        "print(json.dumps({'codes': codes, 'tf': 'tensorflow' in sys.modules}))\n")
    import surgeon
    code = os.path.dirname(os.path.dirname(surgeon.__file__))  # the surgeon under test
    env = dict(os.environ, PYTHONPATH=code, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["codes"] == [2] * len(cases), r.stderr[-3000:]
    assert r.stderr.count("output is the input") == len(cases), r.stderr[-3000:]
    assert out["tf"] is False, "TensorFlow was loaded before the refusal"
    assert snapshot(tmp_path) == before
