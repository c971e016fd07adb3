"""TensorFlow as surgeon and its test suite load it: on any x86-64 CPU, quietly, only when needed.

* A native crash (TensorFlow's oneDNN SIGSEGV on AVX-512/AMX Xeons) fails one test, not the
  whole run (pytest-xdist worker, configured in pyproject.toml).
* oneDNN is off for the test session and in surgeon (unless the user set the variable).
* Every TensorFlow/Keras import in surgeon goes through ``surgeon/core/tf.py``.
* Commands print nothing of TensorFlow's by default; ``--verbose`` shows it.
* Mistakes that need no TensorFlow are reported before it loads.
"""
import ast
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import FIXTURES, ROOT, fixture

SURGEON = ROOT / "surgeon"


def _env(**extra):
    """The environment of a fresh user shell: none of the TensorFlow settings preset."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL", "SURGEON_VERBOSE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


# -- a native crash is one test's failure ------------------------------------------------
CRASHY = '''
import os, signal


def test_native_crash():
    os.kill(os.getpid(), signal.SIGSEGV)


def test_after_the_crash_still_runs():
    assert 1 + 1 == 2
'''


def test_a_native_crash_fails_that_test_and_the_rest_still_run(tmp_path):
    """Runs pytest with the project's own options (pyproject.toml) on a planted SIGSEGV."""
    (tmp_path / "test_crashy.py").write_text(CRASHY)
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
                        "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "-rf",
                        str(tmp_path / "test_crashy.py")],
                       capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, (r.returncode, out[-3000:])  # 1 = tests failed, not a crash
    assert "crashed while running 'test_crashy.py::test_native_crash'" in out, out[-3000:]
    assert "FAILED test_crashy.py::test_native_crash" in out, out[-3000:]
    assert "1 failed, 1 passed" in out, out[-3000:]


def test_the_test_session_runs_tensorflow_without_onednn():
    """Set by conftest.py before any import, inherited by every subprocess."""
    assert os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0"
    code = ("import tensorflow as tf\n"
            "from tensorflow.python.util import _pywrap_util_port as p\n"
            "print(p.IsMklEnabled())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stderr[-2000:]


# -- one place imports TensorFlow -------------------------------------------------------
def _direct_tf_imports(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
                yield f"{path.relative_to(ROOT)}:{node.lineno}: import {name}"


def test_surgeon_imports_tensorflow_only_through_its_helper():
    """Else the oneDNN/quiet settings would depend on which module happens to load TF first."""
    found = [hit for p in sorted(SURGEON.rglob("*.py")) if p.relative_to(SURGEON).as_posix() != "core/tf.py"
             for hit in _direct_tf_imports(p)]
    assert found == [], "\n".join(found)


def test_a_users_own_onednn_setting_wins():
    from surgeon.core.tf import configure_env
    assert configure_env({})["TF_ENABLE_ONEDNN_OPTS"] == "0"
    assert configure_env({"TF_ENABLE_ONEDNN_OPTS": "1"})["TF_ENABLE_ONEDNN_OPTS"] == "1"


DATA_PROBE = '''
import os
import numpy as np


def probe_data(seed=None):
    """cnn_adam's data; records the TensorFlow setup surgeon ran with."""
    from tensorflow.python.util import _pywrap_util_port as p
    with open(os.environ["PROBE_OUT"], "w") as f:
        f.write(f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS')} {p.IsMklEnabled()}")
    rs = np.random.RandomState(0)
    return rs.standard_normal((8, 8, 8, 3)).astype("float32"), rs.randint(0, 3, 8)
'''


def test_resume_runs_without_onednn_and_prints_no_tensorflow_noise(tmp_path):
    """A user's shell without any TF variable: surgeon turns oneDNN off before TF loads, and
    TensorFlow's start-up lines (absl pre-init notes, cuda stub) do not reach stderr."""
    (tmp_path / "probe.py").write_text(DATA_PROBE)
    env = _env(PROBE_OUT=str(tmp_path / "probe.txt"))
    r = subprocess.run([sys.executable, "-m", "surgeon", "resume", fixture("cnn_adam.keras"),
                        "--data", f"{tmp_path / 'probe.py'}:probe_data", "--batch-size", "4",
                        "--steps", "2", "-o", tmp_path / "out.keras", "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "probe.txt").read_text() == "0 False"
    assert r.stderr == "", r.stderr[-3000:]


def test_verbose_shows_what_the_default_hides(tmp_path):
    """Keras' own warning when writing a legacy .h5 (absl logging) and TF's native lines."""
    def convert(*flags):
        out = tmp_path / f"out{len(flags)}.h5"
        return subprocess.run([sys.executable, "-m", "surgeon", *flags, "convert",
                               fixture("cnn_adam.keras"), out],
                              capture_output=True, text=True, env=_env(), timeout=600)
    quiet, loud = convert(), convert("--verbose")
    assert quiet.returncode == 0 and loud.returncode == 0, (quiet.stderr, loud.stderr)
    assert quiet.stderr == "", quiet.stderr[-3000:]
    assert "WARNING:absl:You are saving your model as an HDF5 file" in loud.stderr, loud.stderr


def test_a_failing_tensorflow_import_is_not_silenced(tmp_path):
    """The native-stderr capture replays what it caught when the import fails."""
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os\nos.write(2, b'native: cannot load libtensorflow\\n')\n"
                                      "raise ImportError('broken tensorflow')\n")
    code = "from surgeon.core.tf import import_tf\nimport_tf()"
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), str(ROOT)]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 1
    assert "native: cannot load libtensorflow" in r.stderr and "broken tensorflow" in r.stderr


# -- mistakes that need no TensorFlow come first -----------------------------------------
PROBE = textwrap.dedent('''
    import atexit, sys
    atexit.register(lambda: print("TENSORFLOW-IMPORTED", "tensorflow" in sys.modules,
                                  "keras" in sys.modules))
    from surgeon.cli import main
    main(sys.argv[1:], prog_name="surgeon")
''')

EARLY = [
    (["convert", FIXTURES / "tf" / "keras3_cnn_adam", "{tmp}/out.keras"], "pass --like"),
    (["convert", FIXTURES / "tf" / "module_savedmodel", "{tmp}/out.keras"], "pass --like"),
    (["convert", FIXTURES / "cnn_adam.keras", "{tmp}/out.keras", "--like", "{tmp}/no.keras"],
     "no such file"),
    (["resume", "{tmp}/missing.keras", "--data", "recipes/example_data.py:cnn_data",
      "--steps", "1", "-o", "{tmp}/out.keras"], "no such file"),
    (["resume", FIXTURES / "cnn_adam.keras", "--data", "{tmp}/missing.py:f", "--steps", "1",
      "-o", "{tmp}/out.keras"], "no such file"),
    (["resume", FIXTURES / "cnn_adam.keras", "--data", "recipes/example_data.py:cnn_data",
      "--steps", "1", "-o", "{tmp}/nodir/out.keras"], "does not exist"),
    (["resume", FIXTURES / "cnn_adam.keras", "--data", "recipes/example_data.py:cnn_data",
      "--steps", "1", "-o", FIXTURES / "cnn_adam.keras"], "output is the input"),
    (["diff", FIXTURES / "tf" / "keras3_cnn_adam", "{tmp}/missing.keras"], "no such file"),
    (["insert-layer", FIXTURES / "structure" / "mlp_adam.keras", "--after", "fc1",
      "--layer-json", '"Dropout"', "--name", "d"], "-o/--output is required"),
    (["replace-layer", FIXTURES / "structure" / "mlp_adam.keras", "--layer", "fc2",
      "--layer-json", '{"class_name": "Dense", "config": {"units": 8}}'],
     "-o/--output is required"),
]


@pytest.mark.parametrize("args,message", EARLY, ids=lambda v: v if isinstance(v, str) else
                         "-".join(str(a).rsplit("/", 1)[-1] for a in v[:2]))
def test_mistakes_are_reported_before_tensorflow_loads(tmp_path, args, message):
    argv = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                       cwd=ROOT, env=_env(), timeout=300)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert r.stderr.startswith("surgeon: error: ") and message in r.stderr, r.stderr
    assert "TENSORFLOW-IMPORTED False False" in r.stdout, r.stdout
    assert elapsed < 5, f"{elapsed:.1f}s"  # loading TensorFlow alone takes ~8 s here
