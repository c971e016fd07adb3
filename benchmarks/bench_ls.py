#!/usr/bin/env python
"""Benchmark: ``surgeon ls`` vs ``keras.saving.load_model`` vs ``h5ls -r`` on a big checkpoint.

Generates a Dense(2048) tower with Adam state (~--size-mb per file, .keras and
.weights.h5), then measures each route in a fresh child process (wall time, peak RSS):

  surgeon ls X.weights.h5 --model X.keras   (and surgeon ls X.keras)
  keras     keras.saving.load_model(X.keras)  (what a user runs to look inside)
  h5ls -r   h5ls -r X.weights.h5              (HDF5's own lister; apt install hdf5-tools)

and checks that ``surgeon ls`` did not import TensorFlow. Usage:

    python benchmarks/bench_ls.py                    # ~1 GB per file
    python benchmarks/bench_ls.py --size-mb 256 --workdir /tmp/bench
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tower import PY, measure, mb, tower  # noqa: E402

LS_NO_TF = """\
import sys
from surgeon.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    bad = [m for m in ("tensorflow", "keras") if m in sys.modules]
    if bad:
        raise SystemExit(f"surgeon ls imported {bad}")
"""
KERAS_LOAD = """\
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
m = keras.saving.load_model(sys.argv[1])
print(sum(int(v.numpy().size) for v in m.weights) + sum(int(v.numpy().size) for v in m.optimizer.variables))
"""


def best(cmd, repeat):
    runs = [measure(cmd) for _ in range(repeat)]
    for r in runs:
        if r[2] != 0:
            raise SystemExit(f"failed ({r[2]}): {' '.join(map(str, cmd))}")
    return min(r[0] for r in runs), max(r[1] for r in runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3, help="runs per fast route (min time kept)")
    ap.add_argument("--workdir", default=None, help="keep generated files here (reused)")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ls_"))
    work.mkdir(parents=True, exist_ok=True)
    stem = tower(work, args.size_mb)
    h5, kfile = Path(str(stem) + ".weights.h5"), stem.with_suffix(".keras")
    routes = {
        "surgeon ls .weights.h5": ([PY, "-c", LS_NO_TF, "ls", h5, "--model", kfile], args.repeat),
        "surgeon ls .keras": ([PY, "-c", LS_NO_TF, "ls", kfile], args.repeat),
        "surgeon ls --json": ([PY, "-c", LS_NO_TF, "ls", kfile, "--json"], args.repeat),
        "keras load_model": ([PY, "-c", KERAS_LOAD, kfile], 1),
    }
    if shutil.which("h5ls"):
        routes["h5ls -r"] = (["h5ls", "-r", h5], args.repeat)
    res = {name: best(cmd, n) for name, (cmd, n) in routes.items()}
    print(f"\nbench_ls: {h5.name} {mb(h5.stat().st_size)}, {kfile.name} {mb(kfile.stat().st_size)}"
          f" (Dense 2048 tower + Adam); surgeon ls imported no TensorFlow/Keras")
    print(f"| route | wall s | peak RSS |\n|---|---:|---:|")
    for name, (secs, rss) in res.items():
        print(f"| {name} | {secs:.2f} | {mb(rss)} |")
    s = res["surgeon ls .keras"]
    k = res["keras load_model"]
    print(f"\nkeras load_model / surgeon ls (.keras): {k[0] / s[0]:.1f}x time, "
          f"{k[1] / s[1]:.1f}x peak RSS")
    if "h5ls -r" in res:
        h = res["h5ls -r"]
        print(f"surgeon ls (.weights.h5) / h5ls -r: {res['surgeon ls .weights.h5'][0] / h[0]:.1f}x time"
              " (surgeon also binds optimizer slots and parses the model config)")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
