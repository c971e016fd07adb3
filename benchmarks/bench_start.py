#!/usr/bin/env python
"""Benchmark (issue 14, goal 5): start-up of commands on a small model.

Each command runs in a fresh child (wall time, peak RSS; best of --reps after a warm-up)
on fixtures/structure/mlp_adam.keras (a few kB):

  widen (writing)    surgeon widen --layer fc1 --to 16 -o OUT   (goal: <= 1.5 s wall)
  widen --dry-run    the same, planning only
  ls                 surgeon ls  (must stay TF-free: checked through -X importtime)
  python -c pass     the interpreter alone

    python benchmarks/bench_start.py [--reps 3]
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tower import PY, mb, measure  # noqa: E402

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
print("TF:" + str(any(m.split(".")[0] in ("tensorflow", "keras") for m in sys.modules)))
"""


def imports_tf(cmd) -> bool:
    """Whether ``python -m surgeon ARGS`` (``cmd``) imported TensorFlow or Keras."""
    res = subprocess.run([PY, "-c", PROBE, *cmd[2:]], capture_output=True, text=True)
    return "TF:True" in res.stdout


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
    print("| command | wall s | peak RSS | imports TensorFlow/Keras |")
    print("|---|---:|---:|---|")
    best = {}
    for name, cmd in routes.items():
        runs = []
        for _ in range(args.reps + 1):
            out.unlink(missing_ok=True)
            secs, rss, rc, _ = measure([PY, *cmd], env=env)
            if rc != 0:
                raise SystemExit(f"failed ({rc}): {cmd}")
            runs.append((secs, rss))
        best[name] = min(runs[1:])
        out.unlink(missing_ok=True)
        tf = imports_tf([str(c) for c in cmd]) if name != "python -c pass" else False
        out.unlink(missing_ok=True)
        print(f"| {name} | {best[name][0]:.2f} | {mb(best[name][1])} | {'yes' if tf else 'no'} |")
        best[name] += (tf,)
    w = best["widen (writing)"][0]
    print(f"GOAL 5 | widen writing its output on a small model, wall | {w:.2f} s | <= {GOAL} s "
          f"| {'met' if w <= GOAL else 'missed'}")
    print(f"GOAL 5 | ls stays TF-free | {'TF-free' if not best['ls'][2] else 'imports TF'} "
          f"| TF-free | {'met' if not best['ls'][2] else 'missed'}")
    out.unlink(missing_ok=True)
    work.rmdir()


if __name__ == "__main__":
    main()
