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
"""
from __future__ import annotations

import importlib
import os
import sys
import tempfile

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
    return tf_module("keras")


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
