#!/usr/bin/env python
"""Benchmark: ``surgeon diff`` vs ``h5diff -r`` on two Keras 3 ``.weights.h5`` files that
differ in one layer. Prints wall time, peak RSS and the ratio, measured in the same run.

    python benchmarks/bench_diff.py                 # 256 MB per file
    python benchmarks/bench_diff.py --size-mb 1024  # the issue's ~1 GB target

The files use Keras 3's weights layout (``layers/dense_k/vars/{0,1}``), written with h5py
(building a 1 GB Keras model would dominate the run). Layer ``dense_<middle>``'s kernel
differs in every element in B. h5diff comes from Debian's ``hdf5-tools``
(``apt-get install -y hdf5-tools``); without it the benchmark says so and times surgeon only.
Target (issue 6): surgeon <= 1.5x h5diff's wall time; surgeon's peak RSS bounded by the
chunk size (``--chunk``), not the file size.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SURGEON = [sys.executable, "-m", "surgeon"]


def make_pair(outdir: Path, size_mb: int, layers: int):
    """A and B: ``layers`` Dense layers of float32 totalling ``size_mb``; B differs in one."""
    per = size_mb * 2**20 // layers // 4
    cols = 1024
    rows = max(1, per // cols)
    a, b = outdir / "a.weights.h5", outdir / "b.weights.h5"
    rng = np.random.default_rng(0)
    with h5py.File(a, "w") as f:
        f.attrs["keras_version"] = "3.15.1"
        for i in range(layers):
            g = f.create_group(f"layers/dense_{i}/vars")
            g.attrs["name"] = f"dense_{i}"
            ds = g.create_dataset("0", (rows, cols), np.float32)
            for r in range(0, rows, 8192):  # write in slabs: bounded memory here too
                n = min(8192, rows - r)
                ds[r:r + n] = rng.standard_normal((n, cols), np.float32) * 0.02
            g.create_dataset("1", data=np.zeros(cols, np.float32))
    shutil.copyfile(a, b)
    target = f"layers/dense_{layers // 2}/vars/0"
    with h5py.File(b, "r+") as f:
        ds = f[target]
        for r in range(0, ds.shape[0], 8192):
            ds[r:r + 8192] = ds[r:r + 8192] + np.float32(1e-3)
    return a, b, target


def run(cmd):
    """(wall seconds, peak RSS bytes, exit code) of one child process.

    Peak RSS comes from GNU time (``/usr/bin/time -f %M``) when present: ``wait4``'s
    ru_maxrss would also count this (large) benchmark process copied into the child
    before exec."""
    gnu_time = Path("/usr/bin/time").exists()
    full = ["/usr/bin/time", "-f", "%M"] + cmd if gnu_time else cmd
    t0 = time.perf_counter()
    p = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"})
    _, err = p.communicate()
    wall = time.perf_counter() - t0
    if gnu_time:
        rss = int(err.decode().strip().splitlines()[-1]) * 1024
    else:
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return wall, rss, p.returncode


def measure(name, cmd, repeats, warm=True):
    if warm:
        run(cmd)  # warm the page cache and imports
    walls, rss, code = [], 0, None
    for _ in range(repeats):
        w, r, code = run(cmd)
        walls.append(w)
        rss = max(rss, r)
    med = statistics.median(walls)
    print(f"{name:<28} median {med:7.2f} s  (min {min(walls):.2f}, max {max(walls):.2f})  "
          f"peak RSS {rss / 2**20:7.1f} MB  exit {code}")
    return med, rss, code


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=256, help="size of each file (default 256)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", default="2M", help="surgeon diff --chunk (default 2M)")
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    args = ap.parse_args(argv)
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="bench-diff-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        a, b, target = make_pair(tmp, args.size_mb, args.layers)
        print(f"files: 2 x {a.stat().st_size / 2**20:.0f} MB ({args.layers} layers), B differs in {target}; "
              f"written in {time.perf_counter() - t0:.1f} s")
        s_wall, s_rss, s_code = measure("surgeon diff", SURGEON + ["diff", str(a), str(b), "--chunk", args.chunk],
                                        args.repeats)
        if s_code != 1:
            print(f"unexpected: surgeon diff exited {s_code} (expected 1: files differ)")
        h5diff = shutil.which("h5diff")
        if h5diff is None:
            print("h5diff not found: install Debian's hdf5-tools (apt-get install -y hdf5-tools) "
                  "to compare; only surgeon was timed")
            return 0
        # no warm-up run: the files are in the page cache already, and -r is slow
        h_wall, h_rss, _ = measure("h5diff -r", [h5diff, "-r", str(a), str(b)], args.repeats, warm=False)
        q_wall, _, _ = measure("h5diff -q (no report)", [h5diff, "-q", str(a), str(b)], args.repeats)
        ratio = s_wall / h_wall
        print(f"ratio surgeon / h5diff -r: {ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'}); "
              f"surgeon / h5diff -q: {s_wall / q_wall:.2f}x; "
              f"peak RSS surgeon {s_rss / 2**20:.0f} MB vs h5diff {h_rss / 2**20:.0f} MB "
              f"for {a.stat().st_size / 2**20:.0f} MB files")
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
