"""The one place surgeon imports TensorFlow and Keras (always lazily, on first use).

Every surgeon module gets TensorFlow, Keras or one of their submodules through
``import_tf()``, ``import_keras()`` or ``tf_module(name)``; a test checks that no other
module imports them directly. When surgeon is the one that loads TensorFlow, it first sets
(unless the variable is already set, so a user's choice always wins):

* ``TF_ENABLE_ONEDNN_OPTS=0``: TensorFlow turns its oneDNN kernels on by default only on CPUs
  with AVX-512 VNNI/BF16 or AMX (recent Intel Xeons). There, oneDNN's
  ``conv2d_backprop_filter`` crashes training with SIGSEGV, and results depend on the CPU.
  With it off every x86-64 CPU runs the same Eigen kernels (what AMD CPUs run anyway).
* ``TF_CPP_MIN_LOG_LEVEL=3``: no C++ info/warning/error log lines.

TensorFlow also prints a few native lines while it loads (``Could not find cuda drivers``,
``All log messages before absl::InitializeLog()``, oneDNN notes) that ignore
``TF_CPP_MIN_LOG_LEVEL``: file descriptor 2 points at a temporary file during the import
only, and what was captured is printed if the import fails. TensorFlow's and absl's Python
loggers are set to ERROR (Keras' "saving as HDF5 is legacy" note). ``SURGEON_VERBOSE=1`` (set by
``surgeon --verbose``) keeps all of it: nothing is redirected and the log level is left alone.
If TensorFlow was already imported (e.g. by the user's training script), nothing is changed.

Commands that use Keras only to build, check and serialise a model config (structural ops,
convert's target skeleton) get it from ``import_keras_light()``: in a process the CLI
started (``request_light_keras()``), with neither Keras nor TensorFlow loaded yet, Keras is
imported with its numpy backend and TensorFlow is never loaded (seconds saved at start-up).
A library caller's process keeps the Keras it has or gets (``import_keras()``): the backend
is chosen once per process, so surgeon never picks it behind a user's back.
"""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
import types

VERBOSE_ENV = "SURGEON_VERBOSE"
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def verbose() -> bool:
    """True when TensorFlow's own messages should be shown (``surgeon --verbose``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def configure_env(environ=os.environ):
    """Set surgeon's TensorFlow defaults in ``environ`` (no-op for variables already set)."""
    environ.setdefault(ONEDNN_ENV, "0")
    if not verbose():
        environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return environ


def tf_module(name: str):
    """``importlib.import_module(name)`` after loading TensorFlow as described above."""
    if "tensorflow" not in sys.modules:
        _load_tensorflow()
    return importlib.import_module(name)


def import_tf():
    """The ``tensorflow`` module (loaded quietly, oneDNN off unless asked for)."""
    return tf_module("tensorflow")


def import_keras():
    """The ``keras`` module (TensorFlow backend, loaded through ``import_tf``)."""
    if _LIGHT["loaded"]:
        from surgeon.core.errors import SurgeonError
        raise SurgeonError("internal: this command needs Keras on TensorFlow, but Keras was "
                           f"already loaded with its {_LIGHT['loaded']} backend in this process; "
                           "run it in a process of its own")
    return tf_module("keras")


LIGHT_BACKEND = "numpy"
# False in a process that will need TensorFlow-backed Keras later (the test session).
LIGHT_ALLOWED = True
_LIGHT = {"requested": False, "loaded": None}  # loaded: the backend name
# Optional packages Keras imports when installed (scikit-learn wrappers, plotting, remote
# monitoring, image and dataframe utilities): none builds or serialises a model, and they
# double the import time. Hidden from Keras' own import only.
_SKIPPED_BY_LIGHT = ("sklearn", "matplotlib", "requests", "urllib3", "pandas", "narwhals", "PIL")


def request_light_keras():
    """Called by the CLI: this process may load Keras on its light backend."""
    _LIGHT["requested"] = True


def import_keras_light():
    """The ``keras`` module for building, checking and serialising model configs.

    Light (numpy backend, TensorFlow not loaded) when the CLI asked for it and neither Keras
    nor TensorFlow is loaded yet; else the Keras already loaded (any backend), else
    ``import_keras()``. Light Keras builds models (under ``keras.StatelessScope`` without
    allocating weights), compiles them and serialises their config like Keras on TensorFlow.
    """
    keras = sys.modules.get("keras")
    if keras is not None:
        return keras
    if not (LIGHT_ALLOWED and _LIGHT["requested"]) or "tensorflow" in sys.modules:
        return import_keras()
    before = os.environ.get("KERAS_BACKEND")
    if before not in (None, "", LIGHT_BACKEND):  # the user's own backend wins (all of it)
        return import_keras()
    if before is None:  # children (executors) never inherit ours
        os.environ["KERAS_BACKEND"] = LIGHT_BACKEND
    try:
        keras = _import_light(defer=True)
    except Exception:  # noqa: BLE001 - a Keras that touches JAX while importing: no deferral
        for name in [m for m in sys.modules if m == "keras" or m.startswith("keras.")]:
            del sys.modules[name]
        keras = _import_light(defer=False)
    finally:
        if before is None:
            os.environ.pop("KERAS_BACKEND", None)
    if keras.backend.backend() == "tensorflow":
        return keras
    _LIGHT["loaded"] = keras.backend.backend()
    _as_on_tensorflow()
    if "tensorflow" not in sys.modules:
        # Keras asks ``tf.available`` while serialising (to recognise tf.TensorShape): no
        # TensorFlow object exists in this process, so the answer is no, without importing it.
        importlib.import_module("keras.src.utils.module_utils").tensorflow._available = False
    return keras


def _as_on_tensorflow():
    """Backend-dependent dtypes as Keras on TensorFlow has them, since what light Keras
    describes is read by Keras on TensorFlow: ``"int"`` variables (an optimizer's iteration
    counter) are int64 there, int32 on the other backends; random seed states int64."""
    dtypes = importlib.import_module("keras.src.backend.common.dtypes")
    dtypes.PYTHON_DTYPES_MAP.update({int: "int64", "int": "int64", complex: "complex128"})
    importlib.import_module("keras.src.backend").random_seed_dtype = lambda: "int64"


def _import_light(defer):
    """``import keras`` without the optional packages, and (``defer``) with JAX deferred."""
    finder = _Skip(_SKIPPED_BY_LIGHT)
    sys.meta_path.insert(0, finder)
    stubs = {n: _Deferred(n) for n in _DEFERRED_BY_LIGHT if n not in sys.modules} if defer else {}
    sys.modules.update(stubs)
    _Deferred.importing = True
    try:
        return importlib.import_module("keras")
    finally:
        _Deferred.importing = False
        sys.meta_path.remove(finder)
        for name, stub in stubs.items():
            if sys.modules.get(name) is stub:
                del sys.modules[name]


# Keras' numpy backend imports JAX at import time for two kernels it borrows (convolutions,
# FFTs), and JAX is half of light Keras' import time. These modules are stand-ins while Keras
# imports: what Keras takes from them then is a reference resolved on first use, when the
# real module is imported. Building, compiling and serialising a model never uses them.
_DEFERRED_BY_LIGHT = ("jax", "keras.src.backend.jax.math", "scipy.linalg")


class _Deferred(types.ModuleType):
    """A module that stands for ``name`` until one of its attributes is used."""

    importing = False

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if _Deferred.importing:
            return _DeferredAttr(self.__name__, (attr,))
        return getattr(_real_module(self.__name__), attr)


class _DeferredAttr:
    """``module.a.b...``, looked up in the real module when it is used (called or read)."""

    def __init__(self, module, path):
        self._module, self._path = module, path

    def _resolve(self):
        obj = _real_module(self._module)
        for attr in self._path:
            obj = getattr(obj, attr)
        return obj

    def __getattr__(self, attr):
        if _Deferred.importing:
            return _DeferredAttr(self._module, self._path + (attr,))
        return getattr(self._resolve(), attr)

    def __call__(self, *args, **kwargs):
        return self._resolve()(*args, **kwargs)


def _real_module(name):
    if isinstance(sys.modules.get(name), _Deferred):
        del sys.modules[name]
    return importlib.import_module(name)


def light_module(name: str):
    """``importlib.import_module(name)`` (a ``keras.src`` module) after ``import_keras_light``."""
    import_keras_light()
    return importlib.import_module(name)


class _Skip:
    """A meta-path finder that makes the named top-level packages unimportable."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ImportError(f"{name} is not loaded by surgeon's light Keras")
        return None


def _load_tensorflow():
    configure_env()
    if verbose():
        importlib.import_module("tensorflow")
        return
    with _NativeStderrCaptured():
        tf = importlib.import_module("tensorflow")
    tf.get_logger().setLevel("ERROR")  # Python-side notes (retracing, ...)
    import absl.logging  # noqa: PLC0415 - loaded by TensorFlow; Keras warns through it
    absl.logging.set_verbosity(absl.logging.ERROR)


class _NativeStderrCaptured:
    """Point fd 2 at a temporary file; on an exception, replay what was captured."""

    def __enter__(self):
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            sys.stderr.flush()
        finally:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        if exc_type is not None:
            self._file.seek(0)
            captured = self._file.read().decode(errors="replace")
            if captured:
                sys.stderr.write(captured)
                sys.stderr.flush()
        self._file.close()
        return False
