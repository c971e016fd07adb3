#!/usr/bin/env python
"""Benchmark: ``surgeon apply`` time and peak RSS vs checkpoint size (linear time, flat memory).

For each size (default 0.1, 0.5, 1, 2 GB) a Dense(2048) tower with Adam state is generated
(.keras + .weights.h5) and ``surgeon apply`` runs a recipe that rescales EVERY param by 0.5
with its Adam slots following (every param and slot is decoded, transformed, re-encoded;
the rest is copied), in a fresh child; ``cp`` of the same file is measured alongside.
Reports seconds, seconds per GB, peak RSS, and the largest/smallest ratios.

    python benchmarks/bench_scaling.py                       # 100,500,1024,2048 MB
    python benchmarks/bench_scaling.py --sizes 100,250,500 --workdir /tmp/bench
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tower import PY, measure, mb, tower  # noqa: E402

RECIPE = """\
[[ops]]
op = "rescale"
select = { pattern = "*", role = "param" }
factor = 0.5
slots = "follow"
"""


def run(work, size, fmt, surgeon):
    stem = tower(work, size)
    kfile = stem.with_suffix(".keras")
    src = kfile if fmt == "keras" else Path(str(stem) + ".weights.h5")
    ext = ".keras" if fmt == "keras" else ".weights.h5"
    out = work / f"scaled{ext}"
    recipe = work / "rescale_all.toml"
    recipe.write_text(RECIPE)
    extra = [] if fmt == "keras" else ["--model", kfile]
    cmd = [surgeon, "apply", recipe, "-i", src, "-o", out, "--no-progress", "--no-hash-inputs",
           *extra]
    secs, rss, rc, _ = measure(cmd)
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(map(str, cmd))}")
    out.unlink()
    cp_secs = min(measure(["cp", src, work / f"cp{ext}"])[0] for _ in range(2))
    (work / f"cp{ext}").unlink()
    return src.stat().st_size, secs, rss, cp_secs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,500,1024,2048", help="MB, comma separated")
    ap.add_argument("--formats", default="keras,weights-h5")
    ap.add_argument("--workdir", default=None, help="keep generated files here (reused)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    surgeon = shutil.which("surgeon") or str(Path(PY).parent / "surgeon")
    sizes = [int(s) for s in args.sizes.split(",")]
    for fmt in args.formats.split(","):
        rows = [run(work, s, fmt, surgeon) for s in sizes]
        print(f"\nbench_scaling [{fmt}]: surgeon apply, rescale every param (slots follow)")
        print("| file | surgeon s | s per GB | peak RSS | cp s | surgeon / cp |")
        print("|---:|---:|---:|---:|---:|---:|")
        for size, secs, rss, cp in rows:
            print(f"| {mb(size)} | {secs:.2f} | {secs / (size / 2**30):.2f} | {mb(rss)} | "
                  f"{cp:.2f} | {secs / cp:.1f}x |")
        per_gb = [r[1] / (r[0] / 2**30) for r in rows]
        rss = [r[2] for r in rows]
        print(f"time per GB: {min(per_gb):.2f}-{max(per_gb):.2f} s "
              f"(max/min {max(per_gb) / min(per_gb):.2f}; 1.0 = perfectly linear); "
              f"peak RSS {mb(min(rss))}-{mb(max(rss))} while the file grows "
              f"{rows[-1][0] / rows[0][0]:.0f}x (largest tensor 16 MB)")
    if not (args.workdir or args.keep):
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
