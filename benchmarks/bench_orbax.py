#!/usr/bin/env python
"""Benchmark: edit one array of a big Orbax checkpoint, surgeon (streaming through
TensorStore) vs Orbax's own restore + save of the whole tree, plus `surgeon ls` and cp.

Generates a ``StandardCheckpointer`` PyTree (OCDBT, zarr3: Orbax's defaults) of
N float32 arrays of 16 MB each (random values: zstd cannot shrink them), ~--size-mb in
all, a model-like tree ``layers/dense_i/{kernel,momentum,velocity}``; then, each route in a
fresh child process (wall time, peak RSS of the child from wait4):

  surgeon apply   rescale one kernel (x0.5) into a new checkpoint directory
  orbax           StandardCheckpointer.restore (whole tree), the same edit, save
  surgeon ls      list the checkpoint (reads metadata, no array data)
  cp -r           copy of the directory

Usage:

    python benchmarks/bench_orbax.py                    # ~1 GB
    python benchmarks/bench_orbax.py --size-mb 256 --workdir /tmp/bo
"""
import argparse
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tower import PY, mb, measure  # noqa: E402

ARRAY = 2048  # 2048 x 2048 float32 = 16 MB
GENERATE = textwrap.dedent("""\
    import sys, numpy as np, orbax.checkpoint as ocp
    path, n = sys.argv[1], int(sys.argv[2])
    r = np.random.default_rng(0)
    tree = {"layers": {f"dense_{i}": {k: r.standard_normal((%d, %d), np.float32)
            for k in ("kernel", "momentum", "velocity")} for i in range(n)},
            "step": np.array(1000, np.int64)}
    with ocp.StandardCheckpointer() as c:
        c.save(path, tree)
    """ % (ARRAY, ARRAY))
ORBAX_ROUTE = textwrap.dedent("""\
    import sys, orbax.checkpoint as ocp
    src, dst = sys.argv[1:3]
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(src)
        tree["layers"]["dense_0"]["kernel"] = tree["layers"]["dense_0"]["kernel"] * 0.5
        c.save(dst, tree)
    """)


def generate(workdir: Path, size_mb: int) -> Path:
    n = max(1, round(size_mb / (3 * ARRAY * ARRAY * 4 / 2**20)))
    path = workdir / f"orbax_{size_mb}mb"
    if not path.exists():
        import subprocess
        subprocess.run([PY, "-c", GENERATE, str(path), str(n)], check=True, stderr=subprocess.DEVNULL)
    return path


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-orbax-"))
    workdir.mkdir(parents=True, exist_ok=True)
    src = generate(workdir, args.size_mb)
    recipe = workdir / "edit.toml"
    out = workdir / "out_surgeon"
    recipe.write_text(f'input = "{src}"\noutput = "{out}"\n[[ops]]\nop = "rescale"\n'
                      'select = "layers/dense_0/kernel"\nfactor = 0.5\n')
    routes = [
        ("surgeon apply (rescale one 16 MB array)",
         [PY, "-m", "surgeon", "apply", recipe, "--no-progress", "--no-hash-inputs"], out),
        ("orbax restore + edit + save (whole tree)",
         [PY, "-c", ORBAX_ROUTE, src, workdir / "out_orbax"], workdir / "out_orbax"),
        ("surgeon ls", [PY, "-m", "surgeon", "ls", src], None),
        ("cp -r", ["cp", "-r", src, workdir / "out_cp"], workdir / "out_cp"),
    ]
    print(f"checkpoint: {src} ({mb(du(src))} on disk, largest array 16 MB)\n")
    print("| route | wall s | peak RSS |\n|---|---:|---:|")
    rows = {}
    for name, cmd, target in routes:
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)
        sec, rss, rc, _ = measure(cmd)
        if rc != 0:
            raise SystemExit(f"{name}: exit {rc}: {' '.join(map(str, cmd))}")
        rows[name] = (sec, rss)
        print(f"| {name} | {sec:.2f} | {mb(rss)} |")
    (s_t, s_m), (o_t, o_m) = rows[routes[0][0]], rows[routes[1][0]]
    print(f"\norbax / surgeon apply: {o_t / s_t:.1f}x the time, {o_m / s_m:.1f}x the peak RSS")
    check = [PY, "-m", "surgeon", "diff", src, out, "--json"]
    _, _, rc, text = measure(check)
    print(f"surgeon diff input output: exit {rc} ({'1 tensor changed' if b'changed' in text else '?'})")


if __name__ == "__main__":
    main()
