"""Orbax checkpoints (Keras ``OrbaxCheckpoint``, ``StandardCheckpointer``,
``CheckpointManager``): streaming reader and writer through TensorStore, one array at a time.

Neither TensorFlow nor JAX nor Orbax is imported: the arrays are zarr/zarr3 arrays in an
OCDBT database (or one directory each), opened by TensorStore from the layout Orbax wrote
(see ``orbax_layout``). The writer produces a new directory of the same shape (root with
the one step, step directory, or item directory): untouched arrays are copied as stored
bytes (no decoding), written arrays are encoded with the source array's zarr metadata, the
other items (``model_config``, ``assets``) and metadata files are copied; the result is
renamed into place at the end.
"""
from __future__ import annotations


import numpy as np

from surgeon.core.errors import FormatError, SurgeonError
from . import orbax_layout as lay
from .entry_index import EntryIndex
from . import orbax_names as names
from .orbax_writer import OrbaxWriter, one_line  # noqa: F401  (the registry names the writer here)

# Keras stores float optimizer/metric variables (float32) as Python floats: float64 on disk.
_KERAS_SCALAR = {"float64": "float32"}


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MALLOC_BOUNDED = []


def bound_malloc(threshold=1 << 20) -> None:
    """Serve allocations >= ``threshold`` by mmap, so freed array buffers go back to the OS.

    glibc raises its mmap threshold (up to 32 MB) each time a large mmapped block is
    freed; after the first array, 16 MB buffers then come from the heaps of TensorStore's
    worker threads, which keep them: the peak RSS of a streaming copy grew by one array
    per few arrays copied (236 MB instead of 142 MB for 1 GB of 16 MB arrays). A fixed
    threshold stops that. Process-wide, once; no-op off glibc."""
    if _MALLOC_BOUNDED:
        return
    _MALLOC_BOUNDED.append(True)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold))
    except (OSError, AttributeError):
        pass


class Store:
    """The TensorStore specs of one PyTree item's arrays."""

    def __init__(self, item, meta: dict):
        self.ts = lay.require_tensorstore()
        bound_malloc()
        self.item = item.resolve()  # a local Path or a KvPath (orbax_kv)
        self.ocdbt = bool(meta.get("use_ocdbt", True))
        self.driver = "zarr3" if meta.get("use_zarr3", False) else "zarr"
        self.context = lay.kv_context()  # no cache pool: one array at a time

    def kvstore(self, key=None) -> dict:
        if self.ocdbt:
            kv = {"driver": "ocdbt", "base": lay.kvspec(self.item)}
            return kv | ({"path": f"{key}/"} if key is not None else {})
        return lay.kvspec(self.item, key)

    def open(self, key):
        spec = {"driver": self.driver, "kvstore": self.kvstore(key)}
        return self.ts.open(spec, open=True, read=True, context=self.context).result()


class OrbaxReader(EntryIndex):
    """Canonical view of an Orbax checkpoint (see the module docstring)."""

    format = "orbax"

    def __init__(self, path, step=None):
        self.path = lay.location(path)
        self.label = str(path)
        self.where = lay.locate(self.path, step)
        self.leaves, self.item_meta = lay.tree_metadata(self.where.item)
        self.leaves = [leaf for leaf in self.leaves if leaf.value_type != "string"]
        self.store = Store(self.where.item, self.item_meta)
        if self.store.ocdbt:
            lay.check_ocdbt(self.where.item, self.store.ts)
        self.config = self._model_config()
        self.keras = names.is_keras_tree(self.leaves)
        self._arrays, meta = {}, {}
        for leaf in self.leaves:
            meta[leaf.key] = self._meta(leaf)
        if self.keras:
            entries, self.optimizer = names.keras_entries(self.leaves, meta, self.config)
        else:
            entries, self.optimizer = names.generic_entries(self.leaves, meta), None
        self._entries = entries
        self._by_name = {e.name: e for e in entries}
        self._leaf = {leaf.key: leaf for leaf in self.leaves}
        self.notes, self.mirrors = [], {}
        if self.optimizer is not None and "optimizer/iteration" in self._by_name:
            self.optimizer.iterations = int(self.read("optimizer/iteration"))
        if self.optimizer is not None and "optimizer/learning_rate" in self._by_name:
            self.optimizer.learning_rate = float(self.read("optimizer/learning_rate"))

    def _model_config(self):
        step_dir = self.where.step_dir
        strings = step_dir / "model_config" / "_strings.json" if step_dir else None
        if strings is None or not strings.is_file():
            return None
        import json
        try:
            return json.loads(lay.read_json(strings, "Keras model config")["config"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{strings}: damaged Keras model config") from None

    def _array(self, key):
        arr = self._arrays.get(key)
        if arr is None:
            try:
                arr = self.store.open(key)
            except Exception as exc:  # TensorStore raises ValueError/OSError with a status text
                raise FormatError(f"{self.label}: cannot open array {key!r} "
                                  f"(damaged or incomplete checkpoint): {one_line(exc)}") from None
            self._arrays[key] = arr
        return arr

    def _meta(self, leaf):
        arr = self._array(leaf.key)
        dtype = arr.dtype.name
        if self.keras_scalar(leaf):
            dtype = _KERAS_SCALAR.get(dtype, dtype)
        return tuple(int(d) for d in arr.shape), dtype

    def keras_scalar(self, leaf) -> bool:
        return leaf.value_type == "scalar" and leaf.keys[0] in names.GROUPS[2:]

    def stored_dtype(self, name) -> str:
        return self._array(self.entry(name).key).dtype.name

    # -- reader protocol (entries, entry: EntryIndex) --------------------------------
    def read(self, name) -> np.ndarray:
        e = self.entry(name)
        try:
            out = self._array(e.key).read().result()
        except Exception as exc:
            raise FormatError(f"{self.label}: cannot read {name}: {one_line(exc)}") from None
        out = np.asarray(out)
        return out.astype(e.dtype) if str(out.dtype) != e.dtype else out

    def read_chunks(self, name, max_bytes=8 << 20):
        """``name``'s values as slices along axis 0 of at most ~``max_bytes`` each."""
        e = self.entry(name)
        arr = self._array(e.key)
        nbytes = e.size * arr.dtype.numpy_dtype.itemsize
        if not e.shape or e.shape[0] == 0 or nbytes <= max_bytes:
            yield self.read(name)
            return
        step = max(1, int(max_bytes // max(1, nbytes // e.shape[0])))
        for i in range(0, e.shape[0], step):
            try:
                yield np.asarray(arr[i:i + step].read().result())
            except Exception as exc:
                raise FormatError(f"{self.label}: cannot read {name}: {one_line(exc)}") from None

    def metadata(self) -> dict:
        return {"format": self.format, "path": str(self.path), "step": self.where.step,
                "optimizer": self.optimizer.to_json() if self.optimizer else None,
                "notes": list(self.notes)}

    def close(self):
        self._arrays = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_orbax(path, model=None, step=None):
    if model is not None:
        raise SurgeonError("--model is only for bare weights files; an Orbax checkpoint "
                           "written by Keras has its own model config")
    return OrbaxReader(path, step)
