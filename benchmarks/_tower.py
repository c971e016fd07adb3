"""Shared by bench_ls.py and bench_scaling.py: generate a Dense tower with Adam state, and
measure a command in a fresh child (wall time, peak RSS via wait4)."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

PY = sys.executable
WIDTH = 2048
LAYER_BYTES = 3 * 4 * (WIDTH * WIDTH + WIDTH)  # kernel + bias, with Adam momentum + velocity


def model_code(size_mb: int, loss: str) -> str:
    """Python source that builds and compiles the ~size_mb Dense tower as ``model``
    (Adam, ``loss`` given as a Python expression)."""
    layers = max(1, round(size_mb * 2**20 / LAYER_BYTES))
    return textwrap.dedent(f"""\
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import keras, numpy as np
        keras.utils.set_random_seed(0)
        inp = keras.Input(shape=({WIDTH},), name="x")
        x = inp
        for i in range({layers}):
            x = keras.layers.Dense({WIDTH}, name=f"dense_{{i}}")(x)
        model = keras.Model(inp, x, name="tower")
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss={loss})
        """)


def tower(workdir: Path, size_mb: int) -> Path:
    """``tower_<size>mb.keras`` and ``.weights.h5`` of ~size_mb each (Keras-written, cached)."""
    stem = workdir / f"tower_{size_mb}mb"
    keras_path, h5 = stem.with_suffix(".keras"), Path(str(stem) + ".weights.h5")
    if keras_path.exists() and h5.exists():
        return stem
    code = model_code(size_mb, '"mse"') + textwrap.dedent(f"""\
        model.optimizer.build(model.trainable_variables)
        model.optimizer.iterations.assign(1000)
        model.save(r"{keras_path}")
        model.save_weights(r"{h5}")
        """)
    subprocess.run([PY, "-c", code], check=True, stderr=subprocess.DEVNULL)
    return stem


def measure(cmd, env=None):
    """(seconds, peak RSS bytes, returncode, stdout) of ``cmd`` run in a fresh child."""
    t = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, usage.ru_maxrss * 1024, proc.returncode, out


def mb(n):
    return f"{n / 2**20:,.0f} MB"
