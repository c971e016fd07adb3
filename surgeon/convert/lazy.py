"""A conversion target's skeleton without its weights: Keras builds the model and its
optimizer with every variable *uninitialised* (``StatelessScope(initialize_variables=False)``:
shapes and initialisers, no values) and writes its own ``.keras`` / ``.weights.h5`` layout,
each variable's dataset created with its shape and dtype but no data (HDF5 allocates none).

Building and saving cost no memory or disk per weight, so a 2 GB model's skeleton takes a
fraction of a second. The convert fill writes every tensor from the source; a tensor it does
not write (``--allow-missing``, a fresh metric) gets Keras' initial value from ``initial()``,
and a lazy dataset left unwritten is refused (never a silent zero). May import core; Keras
only through ``surgeon.core.tf``.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from surgeon.core.errors import SurgeonError
from surgeon.core.tf import import_keras_light, light_module


def stateless():
    """The scope in which Keras creates variables without values (nothing allocated)."""
    keras = import_keras_light()
    return keras.StatelessScope(initialize_variables=False)


def lazy_backend() -> bool:
    """Whether the loaded Keras builds lazily: its light backend, whose variables are plain
    holders. On TensorFlow an uninitialised variable breaks ``optimizer.build`` (it needs
    the tf.Variable), so Keras there allocates as usual."""
    return import_keras_light().backend.backend() != "tensorflow"


def build_lazily(fn):
    """``fn()`` (a Keras build step) under ``stateless()`` on a lazy backend, or as it is
    (on TensorFlow, or when a layer sets a variable from a value in its ``build``: Keras
    refuses that in the scope)."""
    if not lazy_backend():
        return fn()
    try:
        with stateless():
            return fn()
    except ValueError as exc:
        if "stateless scope" not in str(exc):
            raise
    return fn()


def jit_compile_as_tensorflow():
    """``compile(jit_compile=...)`` so the saved compile config says what Keras on TensorFlow
    resolves ``"auto"`` to: no XLA on a machine without a GPU (Keras' other backends say
    yes there), else Keras' own per-model answer."""
    if not lazy_backend():
        return "auto"
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu = os.path.exists("/dev/nvidia0") and cuda not in ("", "-1")
    return "auto" if gpu else False


class LazyValues:
    """H5 dataset path (in the skeleton's weights) -> the uninitialised Keras variable."""

    def __init__(self):
        self.by_path = {}

    def initial(self, path):
        """Keras' initial value of the variable stored at ``path`` (its initialiser run)."""
        keras = import_keras_light()
        return np.asarray(keras.ops.convert_to_numpy(self.by_path[path].value))

    def unwritten(self, written):
        return sorted(set(self.by_path) - set(written))


@contextlib.contextmanager
def recording(lazy: LazyValues):
    """While active, Keras' H5 weight store writes an uninitialised variable as an empty
    dataset of its shape and dtype (recorded in ``lazy``); every other value as Keras does.
    Savers that pass ``variable.numpy()`` (optimizers) get a ``_Pending`` for it, which is
    the initial value to any code that uses it as an array."""
    saving_lib = light_module("keras.src.saving.saving_lib")
    variables = light_module("keras.src.backend.common.variables")
    base, numpy = saving_lib.H5IOStore, variables.Variable.numpy

    class LazyH5IOStore(base):
        def __setitem__(self, key, value):
            var = value.variable if isinstance(value, _Pending) else value
            if not _uninitialised(var) or str(var.dtype) == "bfloat16":
                return super().__setitem__(key, np.asarray(value) if var is not value else value)
            if not self._h5_entry_initialized:
                self._create_h5_group(self._h5_entry_path)
            group = self._h5_entry_group
            group.create_dataset(key, shape=tuple(var.shape), dtype=np.dtype(var.dtype))
            lazy.by_path[f"{group.name}/{key}".lstrip("/")] = var

    def pending_numpy(self):
        return _Pending(self) if _uninitialised(self) else numpy(self)

    saving_lib.H5IOStore, variables.Variable.numpy = LazyH5IOStore, pending_numpy
    try:
        yield lazy
    finally:
        saving_lib.H5IOStore, variables.Variable.numpy = base, numpy


class _Pending:
    """An uninitialised variable's ``.numpy()`` while recording."""

    def __init__(self, variable):
        self.variable = variable
        self.shape, self.dtype = tuple(variable.shape), variable.dtype

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self.variable.value)
        return arr if dtype is None else arr.astype(dtype)


def _uninitialised(value):
    return getattr(value, "_initializer", None) is not None and getattr(value, "_value", 0) is None


def fill_unwritten(writer, skel, lazy: LazyValues, written_names):
    """Write Keras' initial value for every skeleton tensor the fill did not write, so no
    empty (all-zero) dataset of the skeleton reaches the output."""
    if not lazy.by_path:
        return []
    mirrors = getattr(skel, "mirrors", {}) or {}
    covered, kept = set(), []
    for e in skel.entries():
        keys = (e.key, *mirrors.get(e.key, ()))
        if e.name in written_names:
            covered.update(keys)
        elif e.key in lazy.by_path:
            writer.write(e.name, lazy.initial(e.key).astype(np.dtype(e.dtype), copy=False)
                         if e.dtype != "bfloat16" else lazy.initial(e.key))
            covered.update(keys)
            kept.append(e.name)
    left = lazy.unwritten(covered)
    if left:
        raise SurgeonError(f"internal: {len(left)} tensor(s) of the target skeleton were not "
                           f"written (first: {left[0]}); nothing was written")
    return kept
