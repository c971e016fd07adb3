#!/usr/bin/env python
"""Benchmark: edit one layer of a big checkpoint with surgeon vs the Keras route vs cp.

Generates a model of N Dense(2048x2048) layers with Adam state (weights + momentum +
velocity = 48 MB per layer), saved as .keras and .weights.h5 (~--size-mb each), then for
each format measures, each in a fresh subprocess (wall time and peak RSS of the child):

  surgeon   surgeon apply RECIPE   (rescale one layer, slots follow; provenance hashed)
  keras     load_model, set_weights on that layer, save (the Keras route)
  cp        cp of the same file

and prints the ratios. Usage:

    python benchmarks/bench_apply.py                  # ~256 MB per file
    python benchmarks/bench_apply.py --size-mb 1024   # ~1 GB (as in issue 4)
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PY = sys.executable
MEASURE = textwrap.dedent("""\
    import resource, subprocess, sys, time
    t = time.perf_counter()
    rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
    dt = time.perf_counter() - t
    print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc)
    """)
KERAS_ROUTE = textwrap.dedent("""\
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    src, dst, layer, weights_only, model_src = sys.argv[1:6]
    if weights_only == "1":
        model = keras.saving.load_model(model_src)
        model.load_weights(src)
    else:
        model = keras.saving.load_model(src)
    lay = model.get_layer(layer)
    k, b = lay.get_weights()
    lay.set_weights([k * 0.5, b * 0.5])
    if weights_only == "1":
        model.save_weights(dst)
    else:
        model.save(dst)
    """)


def make_checkpoints(workdir: Path, layers: int, width: int):
    code = textwrap.dedent(f"""\
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import keras
        keras.utils.set_random_seed(0)
        inp = keras.Input(shape=({width},))
        x = inp
        for i in range({layers}):
            x = keras.layers.Dense({width}, name=f"dense_{{i}}")(x)
        model = keras.Model(inp, x)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        model.optimizer.build(model.trainable_variables)
        model.save(r"{workdir / 'big.keras'}")
        model.save_weights(r"{workdir / 'big.weights.h5'}")
        """)
    subprocess.run([PY, "-c", code], check=True, stderr=subprocess.DEVNULL)


def measure(cmd):
    out = subprocess.run([PY, "-c", MEASURE] + [str(c) for c in cmd], capture_output=True,
                         text=True, check=True).stdout.split()
    secs, rss, rc = float(out[0]), int(out[1]), int(out[2])
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(map(str, cmd))}")
    return secs, rss


def recipe_file(workdir: Path, layer: str) -> Path:
    p = workdir / "edit_one.py"
    p.write_text(textwrap.dedent(f"""\
        from surgeon.recipe import recipe, rescale
        RECIPE = recipe(ops=[rescale("{layer}/*", factor=0.5, slots="follow")])
        """))
    return p


def mb(n):
    return f"{n / 2**20:,.0f} MB"


def bench(workdir: Path, surgeon: str, fmt: str, layer: str, repeat: int):
    src = workdir / ("big.keras" if fmt == "keras" else "big.weights.h5")
    ext = ".keras" if fmt == "keras" else ".weights.h5"
    model_args = [] if fmt == "keras" else ["--model", workdir / "big.keras"]
    recipe = recipe_file(workdir, layer)
    routes = {
        "cp": ["cp", src, workdir / f"cp{ext}"],
        "cp + fsync": ["sh", "-c", f'cp "{src}" "{workdir / f"cpsync{ext}"}" && sync "{workdir / f"cpsync{ext}"}"'],
        "surgeon": [surgeon, "apply", recipe, "-i", src, "-o", workdir / f"surgeon{ext}",
                    "--no-progress"] + model_args,
        "surgeon (no input hash)": [surgeon, "apply", recipe, "-i", src, "-o",
                                    workdir / f"surgeon_nohash{ext}", "--no-progress",
                                    "--no-hash-inputs"] + model_args,
        "keras": [PY, "-c", KERAS_ROUTE, src, workdir / f"keras{ext}", layer,
                  "1" if fmt != "keras" else "0", workdir / "big.keras"],
    }
    results = {}
    for name, cmd in routes.items():
        runs = [measure(cmd) for _ in range(repeat if name != "keras" else 1)]
        results[name] = min(r[0] for r in runs), max(r[1] for r in runs)
    size = src.stat().st_size
    print(f"\n{fmt}: {src.name} {mb(size)}, edit {layer} (largest tensor 16 MB)")
    for name, (secs, rss) in results.items():
        print(f"  {name:<24} {secs:7.2f} s   peak RSS {mb(rss):>10}")
    s, k, c = results["surgeon"], results["keras"], results["cp"]
    print(f"  keras / surgeon time     {k[0] / s[0]:7.1f}x   (goal >= 30x)")
    print(f"  surgeon / cp time        {s[0] / c[0]:7.2f}x   (goal <= 1.5x)")
    print(f"  surgeon / (cp + fsync)   {s[0] / results['cp + fsync'][0]:7.2f}x   "
          "(surgeon fsyncs before its atomic rename)")
    print(f"  surgeon peak RSS         {mb(s[1])} = largest tensor + {mb(s[1] - 16 * 2**20)}"
          f"   (keras: {k[1] / size:.1f}x the file)")
    for p in list(workdir.glob(f"cp*{ext}")) + list(workdir.glob(f"surgeon*{ext}")) + \
            list(workdir.glob(f"keras{ext}")):
        p.unlink()
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=256, help="approximate file size (default 256)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per fast route (min time is kept)")
    ap.add_argument("--workdir", default=None, help="where to put the generated files (default: temp)")
    ap.add_argument("--formats", default="keras,weights-h5")
    args = ap.parse_args(argv)
    width = 2048
    layers = max(2, round(args.size_mb / 48))
    surgeon = shutil.which("surgeon") or str(Path(PY).with_name("surgeon"))
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="surgeon-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"generating {layers} x Dense({width}x{width}) + Adam state in {tmp} ...")
    make_checkpoints(tmp, layers, width)
    layer = f"dense_{layers // 2}"
    try:
        for fmt in args.formats.split(","):
            bench(tmp, surgeon, fmt, layer, args.repeat)
        base = measure([surgeon, "--version"])
        print(f"\nsurgeon CLI start-up alone: {base[0]:.2f} s, {mb(base[1])}")
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
