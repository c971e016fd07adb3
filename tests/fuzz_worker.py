"""Fork server for tests/test_fuzz.py.

The pytest process may have TensorFlow loaded (other tests import it), and forking a
process that has TensorFlow's threads is not safe. So the fuzz cases are forked from a
fresh interpreter started with ``subprocess`` (no TensorFlow, single-threaded): it reads one
JSON request per line, forks a child per case (address-space limit: the server's own size +
1 GiB; a wall-clock watchdog) and answers one JSON line with the child's outcome string,
or ``CRASH ...`` when the child died, hung or raised something unexpected.

Parent side: ``ForkServer().run(fn, *args, timeout=...)``.
"""
import faulthandler
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
import traceback


# -- child-side case functions ------------------------------------------------------------
_ORIGINALS = {}


def _original(name, path, model):
    """Values of the unmodified fixture, read once per server (before any fork)."""
    if name not in _ORIGINALS:
        import surgeon
        with surgeon.open_checkpoint(path, model=model) as ck:
            _ORIGINALS[name] = {e.name: ck.read(e.name) for e in ck.entries()}
    return _ORIGINALS[name]


def check_read(path, model, original):
    """Open, list, read everything; returns 'ok' or 'surgeon <msg>'."""
    import numpy as np
    import surgeon
    try:
        with surgeon.open_checkpoint(path, model=model) as ck:
            entries = ck.entries()
            ck.metadata()
            for e in entries:
                arr = ck.read(e.name)
                assert tuple(arr.shape) == tuple(e.shape), (e.name, arr.shape, e.shape)
                assert str(arr.dtype) == e.dtype, (e.name, arr.dtype, e.dtype)
                if original is not None:
                    np.testing.assert_array_equal(arr, original[e.name])
        return "ok"
    except surgeon.SurgeonError as exc:
        return "surgeon " + str(exc)


def _segv():
    os.kill(os.getpid(), signal.SIGSEGV)
    return ""


def _hang():
    time.sleep(60)
    return ""


def _oom():
    import numpy as np
    return str(np.ones(2**32, dtype=np.float64).sum())


CASES = {"check_read": check_read, "segv": _segv, "hang": _hang, "oom": _oom}


# -- server ---------------------------------------------------------------------------------
def _vm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _fork_case(fn, args, timeout, limit):
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        faulthandler.disable()  # a crash is an expected outcome here, not noise
        try:
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
            out = fn(*args)
        except BaseException:  # noqa: BLE001 - report everything to the parent
            out = "CRASH exception:\n" + traceback.format_exc()
        os.write(wfd, out.encode("utf-8", "replace"))
        os._exit(0)
    os.close(wfd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return f"CRASH timeout after {timeout}s"
            ready, _, _ = select.select([rfd], [], [], min(left, 1.0))
            if ready:
                data = os.read(rfd, 1 << 16)
                if not data:
                    break
                chunks.append(data)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(rfd)
    if os.WIFSIGNALED(status):
        return f"CRASH killed by signal {os.WTERMSIG(status)}"
    return b"".join(chunks).decode("utf-8", "replace")


def serve():
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    import h5py  # noqa: F401 - loaded once, before forking
    import numpy  # noqa: F401
    import surgeon  # noqa: F401
    assert "tensorflow" not in sys.modules
    limit = _vm_bytes() + 2**30
    for line in sys.stdin:
        req = json.loads(line)
        args = list(req["args"])
        if req["fn"] == "check_read" and req.get("original"):
            args[2] = _original(req["original"], req["original_path"], req["original_model"])
        out = _fork_case(CASES[req["fn"]], args, req["timeout"], limit)
        proto.write(json.dumps({"out": out}) + "\n")
        proto.flush()


# -- parent side ----------------------------------------------------------------------------
class ForkServer:
    """A fork server in a fresh interpreter; ``run`` sends one case and waits for its outcome."""

    def __init__(self):
        import surgeon
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(surgeon.__file__)))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONPATH=os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-u", os.path.abspath(__file__)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, fn, *args, timeout, original=None):
        """``original``: (fixture name, path, model) whose values the server reads and caches."""
        req = {"fn": fn, "args": [str(a) if hasattr(a, "__fspath__") else a for a in args],
               "timeout": timeout}
        if original:
            req.update(original=original[0], original_path=str(original[1]),
                       original_model=str(original[2]) if original[2] else None)
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 120)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"fuzz fork server died or stalled (exit {self.proc.poll()})")
        return json.loads(line)["out"]

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    serve()
