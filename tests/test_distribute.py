"""resume under tf.distribute: MirroredStrategy on two logical CPUs, MultiWorkerMirrored
with two worker processes on 127.0.0.1. Each runs in a fresh subprocess (logical devices
and TF_CONFIG must be set before TensorFlow initialises), bounded by a timeout.

The model compared with the single-device run is the LSTM fixture (no BatchNorm: BN
normalises with per-replica batch statistics, so a BN model legitimately differs unless
it uses ``synchronized=True``); the CNN (BatchNorm + frozen layer) is used to check that
every restored variable is identical on every replica.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import fixture
from surgeon import open_checkpoint

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(ROOT, "recipes", "example_data.py")
STEPS = 4


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "recipes"),
         os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def tensors(path):
    with open_checkpoint(path) as ck:
        return {e.name: ck.read(e.name) for e in ck.entries()}


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    from surgeon.train import resume
    out = tmp_path_factory.mktemp("single") / "lstm.keras"
    resume(str(fixture("lstm_adam.keras")), data=f"{DATA}:lstm_data", steps=STEPS, output=str(out))
    return tensors(out)


def assert_close(ref, got):
    assert sorted(ref) == sorted(got)
    for n in ref:
        np.testing.assert_allclose(got[n], ref[n], rtol=2e-4, atol=1e-6, err_msg=n)
    assert int(got["optimizer/iteration"]) == 3 + STEPS


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Start the mirrored run and both workers at once (their TF start-up overlaps)."""
    d = tmp_path_factory.mktemp("dist")
    (d / "m").mkdir()
    (d / "w").mkdir()
    mirrored = subprocess.Popen([sys.executable, HERE, "mirrored", str(d / "m"), str(d / "m.json")],
                                env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers, why = [], None
    try:
        ports = _free_ports(2)
    except OSError as exc:
        why = f"cannot bind local ports for the workers: {exc}"
    else:
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        for i in range(2):
            cfg = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            workers.append(subprocess.Popen(
                [sys.executable, HERE, "multiworker", str(d / "w"), str(d / f"w{i}.json")],
                env=_env(TF_CONFIG=cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    yield d, mirrored, workers, why
    for p in [mirrored] + workers:
        if p.poll() is None:
            p.kill()


def test_mirrored_two_logical_cpus(launched, single_device):
    d, p, _, _ = launched
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    rep = json.loads((d / "m.json").read_text())
    assert rep["replicas"] == 2
    assert rep["restored_identical"] and rep["restored_checked"] == 30  # cnn: every var, both replicas
    assert rep["trained_identical"]
    assert rep["masked_zero_on_replicas"]
    assert rep["callback_replicas"] == 2 and rep["callback_zero_on_replicas"]
    assert_close(single_device, tensors(d / "m" / "lstm_mirrored.keras"))


def test_multiworker_two_processes(launched, single_device):
    d, _, procs, why = launched
    if why:
        pytest.skip(why)
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    except subprocess.TimeoutExpired:  # a deadlock is a failure, not an environment problem
        for p in procs:
            p.kill()
        pytest.fail("multi-worker run did not finish within 240 s (deadlock?)")
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0 and ("Address already in use" in err or "Failed to bind" in err):
            pytest.skip(f"worker could not bind its port: {err.strip().splitlines()[-1]}")
        assert p.returncode == 0, err[-3000:]
    w0, w1 = (json.loads((d / f"w{i}.json").read_text()) for i in range(2))
    assert w0["replicas"] == w1["replicas"] == 2
    assert w0["chief"] and not w1["chief"]
    assert w0["loss"] == pytest.approx(w1["loss"], rel=1e-6)
    assert [p.name for p in (d / "w").glob("*.keras")] == ["lstm_multiworker.keras"]  # chief only
    assert_close(single_device, tensors(d / "w" / "lstm_multiworker.keras"))


# -- subprocess entry points ---------------------------------------------------------------

def _mirrored(outdir, report):
    from surgeon.train.distribute import logical_cpus, replica_values
    logical_cpus(2)
    from surgeon.train import resume
    from surgeon.train.distribute import make_strategy
    # one strategy for the whole process: two MirroredStrategy objects reuse collective
    # instance keys and their all-reduces collide ("Shape mismatch in the collective")
    strategy = make_strategy("mirrored")
    out = {}
    res = resume(str(fixture("cnn_adam.keras")), data=f"{DATA}:cnn_data", steps=0,
                 strategy=strategy, write=False)
    model = res.model
    with open_checkpoint(fixture("cnn_adam.keras")) as ck:
        want = {e.name: ck.read(e.name) for e in ck.entries()}
    from surgeon.train.mapping import map_model
    vm = map_model(model)
    live = {**vm.model, **vm.optimizer}
    checked, same = 0, True
    for name, var in live.items():
        vals = replica_values(var)
        same &= len(vals) == 2 and all(np.array_equal(v, want[name]) for v in vals)
        checked += 1
    out.update(replicas=res.replicas, restored_identical=bool(same), restored_checked=checked)
    res = resume(str(fixture("lstm_adam.keras")), data=f"{DATA}:lstm_data", steps=STEPS,
                 output=os.path.join(outdir, "lstm_mirrored.keras"), strategy=strategy)
    vm = map_model(res.model)
    out["trained_identical"] = all(
        np.array_equal(*replica_values(v)) for v in {**vm.model, **vm.optimizer}.values())
    # masks and a RecipeCallback under the strategy: every replica sees the same edit
    with open_checkpoint(fixture("cnn_adam.keras")) as ck:
        k = ck.read("conv2/kernel")
    keep = np.abs(k) > np.median(np.abs(k))
    res = resume(str(fixture("cnn_adam.keras")), data=f"{DATA}:cnn_data", steps=2,
                 strategy=strategy, write=False, masks={"conv2/kernel": keep})
    vm = map_model(res.model)
    masked = [vm.model["conv2/kernel"]] + list(vm.slots["conv2/kernel"].values())
    out["masked_zero_on_replicas"] = all(
        not np.any(v[~keep]) for var in masked for v in replica_values(var))
    import keras
    from surgeon.keras import RecipeCallback
    from surgeon.train.edits import Zero
    with strategy.scope():
        model = keras.saving.load_model(str(fixture("cnn_adam.keras")))
    import example_data
    model.fit(example_data.cnn_data().take(2), verbose=0, shuffle=False,
              callbacks=[RecipeCallback([Zero(select="head/bias")])])
    vm = map_model(model)
    out["callback_replicas"] = len(replica_values(vm.model["head/bias"]))
    out["callback_zero_on_replicas"] = all(
        not np.any(v) for var in [vm.model["head/bias"], *vm.slots["head/bias"].values()]
        for v in replica_values(var))
    with open(report, "w") as f:
        json.dump(out, f)


def _multiworker(outdir, report):
    from surgeon.train import resume
    from surgeon.train.distribute import is_chief, make_strategy
    strategy = make_strategy("multiworker")
    res = resume(str(fixture("lstm_adam.keras")), data=f"{DATA}:lstm_data", steps=STEPS,
                 output=os.path.join(outdir, "lstm_multiworker.keras"), strategy=strategy)
    with open(report, "w") as f:
        json.dump({"replicas": res.replicas, "chief": is_chief(strategy), "loss": res.loss}, f)


if __name__ == "__main__":
    {"mirrored": _mirrored, "multiworker": _multiworker}[sys.argv[1]](sys.argv[2], sys.argv[3])
