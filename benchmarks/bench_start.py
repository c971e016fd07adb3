#!/usr/bin/env python
"""Benchmark (issue 14, goal 5): start-up of commands on a small model.

Each command runs in a fresh child (wall time, peak RSS; best of --reps after a warm-up)
on fixtures/structure/mlp_adam.keras (a few kB):

  widen (writing)    surgeon widen --layer fc1 --to 16 -o OUT   (goal: <= 1.5 s wall;
                     Keras on its light numpy backend, TensorFlow never loaded)
  widen --dry-run    the same, planning only
  ls                 surgeon ls  (must stay TF- and Keras-free)
  python -c pass     the interpreter alone

CPU s (user + system of the child) is printed beside the wall time: on a loaded machine
the wall time mostly measures the wait for a core.

    python benchmarks/bench_start.py [--reps 3]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tower import PY, mb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "fixtures" / "structure" / "mlp_adam.keras"
GOAL = 1.5


PROBE = """\
import runpy, sys
sys.argv = ["surgeon"] + sys.argv[1:]
try:
    runpy.run_module("surgeon", run_name="__main__")
except SystemExit:
    pass
print("TF:" + str("tensorflow" in sys.modules), "KERAS:" + str("keras" in sys.modules))
"""


def imports(cmd) -> tuple:
    """(TensorFlow, Keras): whether ``python -m surgeon ARGS`` (``cmd``) imported them."""
    res = subprocess.run([PY, "-c", PROBE, *cmd[2:]], capture_output=True, text=True)
    return "TF:True" in res.stdout, "KERAS:True" in res.stdout


def measure_cpu(cmd, env):
    """(wall s, peak RSS, returncode, CPU s) of ``cmd`` in a fresh child."""
    t = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    return (time.perf_counter() - t, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status),
            usage.ru_utime + usage.ru_stime)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_start_"))
    out = work / "wide.keras"
    s = ["-m", "surgeon"]
    routes = {
        "widen (writing)": s + ["widen", MODEL, "--layer", "fc1", "--to", "16", "-o", out],
        "widen --dry-run": s + ["widen", MODEL, "--layer", "fc1", "--to", "16", "--dry-run"],
        "ls": s + ["ls", MODEL],
        "python -c pass": ["-c", "pass"],
    }
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    print(f"bench_start: {MODEL.name}, best of {args.reps} after a warm-up; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| command | wall s | CPU s | peak RSS | imports TensorFlow | imports Keras |")
    print("|---|---:|---:|---:|---|---|")
    best = {}
    for name, cmd in routes.items():
        runs = []
        for _ in range(args.reps + 1):
            out.unlink(missing_ok=True)
            secs, rss, rc, cpu = measure_cpu([PY, *cmd], env=env)
            if rc != 0:
                raise SystemExit(f"failed ({rc}): {cmd}")
            runs.append((secs, cpu, rss))
        best[name] = min(runs[1:])
        out.unlink(missing_ok=True)
        tf, ks = imports([str(c) for c in cmd]) if name != "python -c pass" else (False, False)
        out.unlink(missing_ok=True)
        secs, cpu, rss = best[name]
        print(f"| {name} | {secs:.2f} | {cpu:.2f} | {mb(rss)} | {'yes' if tf else 'no'} "
              f"| {'yes (numpy backend)' if ks and not tf else 'yes' if ks else 'no'} |")
        best[name] += (tf, ks)
    w = best["widen (writing)"]
    print(f"GOAL 5 | widen writing its output on a small model, wall (CPU {w[1]:.2f} s) | "
          f"{w[0]:.2f} s | <= {GOAL} s | {'met' if w[0] <= GOAL else 'missed'}")
    print(f"GOAL 5 | widen writing stays TF-free | {'imports TF' if w[3] else 'TF-free'} "
          f"| TF-free | {'missed' if w[3] else 'met'}")
    ls_free = not (best["ls"][3] or best["ls"][4])
    print(f"GOAL 5 | ls stays TF-free | {'TF-free' if ls_free else 'imports TF/Keras'} "
          f"| TF-free | {'met' if ls_free else 'missed'}")
    out.unlink(missing_ok=True)
    work.rmdir()


if __name__ == "__main__":
    main()
