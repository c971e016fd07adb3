#!/usr/bin/env python
"""Benchmark: ``surgeon apply`` time and peak RSS vs checkpoint size (linear time, flat memory).

For each size (default 0.1, 0.5, 1, 2 GB) a Dense(2048) tower with Adam state is generated
(.keras + .weights.h5) and ``surgeon apply`` runs a recipe that rescales EVERY param by 0.5
with its Adam slots following (every param and slot is decoded, transformed, re-encoded;
the rest is copied), in a fresh child; ``cp`` + ``sync`` of the same file is measured
alongside (surgeon fsyncs its output). Reports seconds, seconds per GB, peak RSS, and
the largest/smallest ratios. Then, at each size, ``apply --in-place`` rescaling ONE
16 MB layer (slots follow) of a copy of the file (issue 14, goal 2: the time should
stay flat as the file grows), and ``GOAL`` lines (collected by run_all.sh).

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

ONE_LAYER = """\
[[ops]]
op = "rescale"
select = "dense_0/*"
factor = 0.5
slots = "follow"
"""
RECIPE = """\
[[ops]]
op = "rescale"
select = { pattern = "*", role = "param" }
factor = 0.5
slots = "follow"
"""


def run(work, size, fmt, surgeon, repeat):
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
    runs = [measure(cmd) for _ in range(repeat)]
    if any(r[2] != 0 for r in runs):
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}")
    secs, rss = min(r[0] for r in runs), max(r[1] for r in runs)
    out.unlink()
    cp = work / f"cp{ext}"
    cp_secs = min(measure(["sh", "-c", f'cp "{src}" "{cp}" && sync "{cp}"'])[0] for _ in range(2))
    cp.unlink()
    return src.stat().st_size, secs, rss, cp_secs, in_place(work, src, ext, extra, surgeon, repeat)


def in_place(work, src, ext, extra, surgeon, repeat):
    """(seconds, peak RSS) of the best of ``repeat`` one-layer in-place edits of a copy."""
    target = work / f"inplace{ext}"
    shutil.copyfile(src, target)
    recipe = work / "rescale_one.toml"
    recipe.write_text(ONE_LAYER)
    cmd = [surgeon, "apply", recipe, "-i", target, "--in-place", "--no-progress", *extra]
    runs = [measure(cmd) for _ in range(repeat + 1)][1:]  # the first one warms the cache
    if any(r[2] != 0 for r in runs):
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}")
    target.unlink()
    return min(r[0] for r in runs), max(r[1] for r in runs)


def _fit(x, y):
    """Least-squares line y = a + b x; returns b, a and R^2."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / max(sum((xi - mx) ** 2 for xi in x), 1e-12)
    a = my - b * mx
    ss_res = sum((yi - (a + b * xi)) ** 2 for xi, yi in zip(x, y))
    ss_tot = sum((yi - my) ** 2 for yi in y) or 1e-12
    return b, a, 1 - ss_res / ss_tot


def print_in_place(fmt, rows):
    print(f"\nbench_scaling [{fmt}]: surgeon apply --in-place, rescale ONE 16 MB layer "
          "(slots follow), best of the runs after a warm-up")
    print("| file | in-place s | peak RSS | cp + sync s | in-place / (cp + sync) |")
    print("|---:|---:|---:|---:|---:|")
    for size, _, _, cp, (secs, rss) in rows:
        print(f"| {mb(size)} | {secs:.2f} | {mb(rss)} | {cp:.2f} | {secs / cp:.2f}x |")
    small, big = rows[0], rows[-1]
    flat = big[4][0] / small[4][0]
    print(f"GOAL 2 | [{fmt}] apply --in-place one layer: time at {mb(big[0])} / at {mb(small[0])} "
          f"| {flat:.2f}x | flat (<= 1.5x) | {'met' if flat <= 1.5 else 'missed'}")
    full = big[1] / big[3]
    print(f"GOAL 4 | [{fmt}] every tensor + slots rescaled / cp + sync, {mb(big[0])} "
          f"| {full:.1f}x | <= 3x | {'met' if full <= 3 else 'missed'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,500,1024,2048", help="MB, comma separated")
    ap.add_argument("--formats", default="keras,weights-h5")
    ap.add_argument("--workdir", default=None, help="keep generated files here (reused)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--repeat", type=int, default=2, help="runs per size (min time is kept)")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    surgeon = shutil.which("surgeon") or str(Path(PY).parent / "surgeon")
    sizes = [int(s) for s in args.sizes.split(",")]
    for fmt in args.formats.split(","):
        rows = [run(work, s, fmt, surgeon, args.repeat) for s in sizes]
        print(f"\nbench_scaling [{fmt}]: surgeon apply, rescale every param (slots follow)")
        print("| file | surgeon s | s per GB | peak RSS | cp + sync s | surgeon / (cp + sync) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for size, secs, rss, cp, _ in rows:
            print(f"| {mb(size)} | {secs:.2f} | {secs / (size / 2**30):.2f} | {mb(rss)} | "
                  f"{cp:.2f} | {secs / cp:.1f}x |")
        gb = [r[0] / 2**30 for r in rows]
        secs = [r[1] for r in rows]
        slope, icpt, r2 = _fit(gb, secs)
        rss = [r[2] for r in rows]
        print(f"least-squares fit: time = {icpt:.2f} s + {slope:.2f} s/GB x size, R^2 = {r2:.3f} "
              f"(1 = linear); "
              f"peak RSS {mb(min(rss))}-{mb(max(rss))} while the file grows "
              f"{rows[-1][0] / rows[0][0]:.0f}x (flat: bounded by the largest tensor, 16 MB)")
        print_in_place(fmt, rows)
    if not (args.workdir or args.keep):
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
