#!/usr/bin/env python
"""Benchmark: merge three ~SIZE checkpoints with ``surgeon merge`` vs loading them whole.

Generates a Dense(2048x2048) tower with Adam state (``_tower.py``, Keras-written .keras of
~--size-mb), and two more checkpoints of the same model with other values (``surgeon apply``
of a seeded ``noise`` op: real files Keras loads), then measures, each in a fresh child
process (wall time, peak RSS):

  surgeon linear   surgeon merge a b c --method linear -o out.keras     (streams, writes)
  surgeon ties     surgeon merge --base a b c --method ties -o out.keras
  numpy whole      every weight of a, b and c read into numpy, then averaged (no write)

The streaming merge holds one tensor of every input at a time, so its peak RSS stays at
the interpreter's baseline plus inputs x largest tensor, whatever the checkpoint size.

    python benchmarks/bench_merge.py                 # ~1 GB per checkpoint (3 GB of inputs)
    python benchmarks/bench_merge.py --size-mb 256   # quicker
"""
import argparse
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tower import PY, mb, measure, tower  # noqa: E402

NUMPY_WHOLE = textwrap.dedent("""\
    import sys, numpy as np
    from surgeon.formats import open_checkpoint
    models = []
    for p in sys.argv[1:]:
        with open_checkpoint(p) as ck:  # every weight, whole, in memory
            models.append({e.name: np.array(ck.read(e.name)) for e in ck.entries()
                           if e.role in ("param", "state")})
    avg = {k: sum(m[k] for m in models) / len(models) for k in models[0]}
    print(sum(v.nbytes for v in avg.values()))
    """)
NOISE = textwrap.dedent("""\
    from surgeon.recipe import recipe, noise
    RECIPE = recipe(ops=[noise("*", std={std}, seed={seed})])
    """)


def variants(workdir: Path, size_mb: int):
    stem = tower(workdir, size_mb)
    a = Path(f"{stem}.keras")
    out = [a]
    for seed in (1, 2):
        target = workdir / f"tower_{size_mb}mb_v{seed}.keras"
        if not target.exists():
            rec = workdir / f"noise{seed}.py"
            rec.write_text(NOISE.format(std=0.01, seed=seed))
            _, _, rc, _ = measure([PY, "-m", "surgeon", "apply", rec, "-i", a, "-o", target,
                                   "--no-progress"])
            assert rc == 0, f"making {target} failed"
        out.append(target)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--workdir", default=None, help="keep generated checkpoints here")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="surgeon_bench_merge_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        a, b, c = variants(work, args.size_mb)
        size = sum(p.stat().st_size for p in (a, b, c))
        out = work / "merged.keras"
        rows = []
        for label, cmd in [
            ("surgeon merge linear", [PY, "-m", "surgeon", "merge", a, b, c, "--method", "linear",
                                      "-o", out]),
            ("surgeon merge ties (base a)", [PY, "-m", "surgeon", "merge", "--base", a, b, c,
                                             "--method", "ties", "--density", "0.5", "-o", out]),
            ("numpy: load all whole, average", [PY, "-c", NUMPY_WHOLE, a, b, c]),
        ]:
            if out.exists():
                out.unlink()
            dt, rss, rc, _ = measure(cmd)
            assert rc == 0, f"{label} failed"
            rows.append((label, dt, rss))
        print(f"merge of 3 checkpoints, {mb(size)} in total (~{args.size_mb} MB each; weights "
              "+ Adam slots; the merge reads the weights, the slots are reset)\n")
        print("| route | time | peak RSS |\n|---|---:|---:|")
        for label, dt, rss in rows:
            print(f"| {label} | {dt:.1f} s | {mb(rss)} |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
