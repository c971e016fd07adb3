#!/usr/bin/env python
"""Benchmark: ``surgeon convert`` legacy H5 -> .keras vs the Keras route (load legacy, save).

Generates a Dense(2048) tower with Adam state and writes it with Keras' legacy H5 writer
(``model.save("x.h5")``, ~--size-mb), then in fresh child processes (wall time, peak RSS):

  surgeon  surgeon convert x.h5 y.keras   (Keras on its light numpy backend, no TensorFlow;
           the target built without weight values, tensors streamed one at a time)
  keras    keras.saving.load_model("x.h5"); model.save("y.keras")

CPU s (user + system of the child, all its threads) is printed beside the wall time: on a
loaded machine the wall time mostly measures the wait for a core.

    python benchmarks/bench_convert.py                  # ~256 MB
    python benchmarks/bench_convert.py --size-mb 1024
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tower import PY, WIDTH, measure, mb, model_code  # noqa: E402


def measure_cpu(cmd):
    """(wall s, peak RSS, returncode, CPU s) of ``cmd`` in a fresh child."""
    t = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    return (time.perf_counter() - t, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status),
            usage.ru_utime + usage.ru_stime)

KERAS_ROUTE = """\
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
model = keras.saving.load_model(sys.argv[1])
model.save(sys.argv[2])
"""


def legacy_tower(work: Path, size_mb: int) -> Path:
    path = work / f"tower_{size_mb}mb_legacy.h5"
    if path.exists():
        return path
    # a loss object: Keras 3 cannot reload a legacy H5 compiled with the string "mse"
    code = model_code(size_mb, "keras.losses.MeanSquaredError()") + textwrap.dedent(f"""\
        d = np.zeros((2, {WIDTH}), "float32")
        model.fit(d, d, epochs=1, verbose=0)
        model.save(r"{path}")
        """)
    subprocess.run([PY, "-c", code], check=True, stderr=subprocess.DEVNULL)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--workdir", default=None, help="keep generated files here (reused)")
    ap.add_argument("--reps", type=int, default=1, help="paired runs; medians are reported")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    src = legacy_tower(work, args.size_mb)
    surgeon = shutil.which("surgeon") or str(Path(PY).parent / "surgeon")
    routes = {"surgeon convert": [surgeon, "convert", src, work / "surgeon.keras"],
              "keras load + save": [PY, "-c", KERAS_ROUTE, src, work / "keras.keras"]}
    runs = {name: [] for name in routes}
    for _ in range(args.reps):
        for name, cmd in routes.items():
            secs, rss, rc, cpu = measure_cpu(cmd)
            if rc != 0:
                raise SystemExit(f"failed ({rc}): {' '.join(map(str, cmd))}")
            runs[name].append((secs, rss, cpu))
    res = {name: tuple(statistics.median(r[i] for r in rs) for i in range(3))
           for name, rs in runs.items()}
    print(f"\nbench_convert: {src.name} {mb(src.stat().st_size)} (legacy H5, Adam state) -> .keras; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| route | wall s | CPU s | peak RSS |\n|---|---:|---:|---:|")
    for name, (secs, rss, cpu) in res.items():
        print(f"| {name} | {secs:.2f} | {cpu:.2f} | {mb(rss)} |")
    s, k = res["surgeon convert"], res["keras load + save"]
    print(f"\nkeras / surgeon: {k[0] / s[0]:.2f}x time ({k[2] / s[2]:.2f}x CPU), {k[1] / s[1]:.2f}x "
          "peak RSS (surgeon: light Keras, no TensorFlow; Keras: TensorFlow)")
    base = measure([PY, "-c", "import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'; import keras"])[1]
    bound = base + 16 * 2**20 + 200 * 2**20  # Keras-import baseline + largest tensor + 200 MB
    size = mb(src.stat().st_size)
    print(f"GOAL 3 | convert legacy .h5 -> .keras ({size}): keras load + save / surgeon convert "
          f"| {k[0] / s[0]:.2f}x | >= 3x | {'met' if k[0] / s[0] >= 3 else 'missed'}")
    print(f"GOAL 3 | convert ({size}) peak RSS vs Keras-import baseline {mb(base)} + 16 MB + 200 MB "
          f"| {mb(s[1])} | <= {mb(bound)} | {'met' if s[1] <= bound else 'missed'}")
    for p in ("surgeon.keras", "keras.keras"):
        (work / p).unlink(missing_ok=True)
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
