"""Keras 3 ``.weights.h5`` and sharded ``.weights.json``: reader and lossless writer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from surgeon.core.errors import FormatError, SurgeonError, WriteError
from surgeon.core import atomic
from . import keras_layout, rawread
from .entry_index import EntryIndex
from .h5tree import Node, check_dataset, snapshot


# What h5py/numpy raise on a damaged file; turned into one-line FormatErrors at the edge.
DAMAGE = (KeyError, ValueError, OSError, RuntimeError, TypeError, IndexError, AttributeError,
          OverflowError, RecursionError)


def _join_name(layer, leaf):
    return f"{layer}/{leaf}" if layer else leaf


def first_line(exc) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def open_h5(source, label) -> h5py.File:
    """Open an HDF5 file (path or file object) read-only, with a one-line error."""
    try:
        f = h5py.File(source, "r")
        f.surgeon_source = source  # raw bytes for h5tree's heap checks
        return f
    except FileNotFoundError:
        raise FormatError(f"{label}: no such file") from None
    except DAMAGE as exc:
        raise FormatError(f"{label}: not a readable HDF5 file (truncated or corrupt): "
                          f"{first_line(exc)}") from None


def to_numpy(ds: h5py.Dataset, bf16: bool) -> np.ndarray:
    check_dataset(ds)
    return _bf16(np.asarray(ds[()]), bf16)


def _bf16(arr, bf16):
    if bf16:
        import ml_dtypes
        arr = arr.view(ml_dtypes.bfloat16) if arr.dtype.itemsize == 2 else arr.astype(ml_dtypes.bfloat16)
    return arr


class KerasH5Reader(EntryIndex):
    """Canonical view of Keras 3 weights stored in one or more H5 files."""

    format = "keras-weights-h5"

    def __init__(self, path, files, model_json=None, label=None):
        self.path = Path(path)
        self.label = label or str(path)
        self._files = files
        self._raw_fds = {}  # (pid, file index) -> (fd, base, size) for raw reads
        try:
            self._root = snapshot(files)
            self._build(model_json)
        except SurgeonError:
            self.close()
            raise
        except DAMAGE as exc:
            self.close()
            raise FormatError(f"{self.label}: damaged Keras weights structure: {first_line(exc)}") from None

    def _build(self, model_json):
        if "layers" not in self._root and "vars" not in self._root:
            raise FormatError(f"{self.label}: no Keras 3 weights found "
                              "(expected groups 'layers/.../vars'); is this a legacy Keras H5?")
        with_config = model_json is not None
        cls = model_json.get("class_name") if with_config else None
        cfg = model_json.get("config") if with_config else None
        root = keras_layout.build_objects(self._root, "", "", cls, cfg,
                                          (cfg or {}).get("trainable", True), with_config)
        self._objects = root if with_config else None  # for the --model fit check
        qnotes = []
        known = self._keras_classes(root, model_json, qnotes)
        entries, trainable, candidates, certain = keras_layout.layer_entries(
            self._root, root, with_config, qnotes, known)
        opt_cfg = ((model_json or {}).get("compile_config") or {}).get("optimizer")
        if isinstance(opt_cfg, str):
            opt_cfg = {"class_name": opt_cfg, "config": {}}
        oentries, self.optimizer, self.notes = keras_layout.optimizer_entries(
            self._root, opt_cfg, trainable, candidates, with_config and certain, self._dataset)
        self.notes = qnotes + self.notes
        self.mirrors = self.optimizer.mirrors if self.optimizer else {}
        self._index(entries + oentries)

    def _keras_classes(self, root, model_json, notes):
        """Keras' own names and roles for layers surgeon has no table for (or None)."""
        unknown = keras_layout.unknown_layers(root)
        if not unknown:
            return None
        from . import keras_classes
        known = keras_classes.from_config(model_json) if model_json is not None else None
        if known is not None and all(len(known.by_path.get(o.path, ())) == len(o.var_keys)
                                     for o in keras_layout.walk(root) if o.var_keys):
            return known
        o = unknown[0]
        notes.append(
            f"{len(unknown)} layer(s) of classes surgeon has no table for (first: "
            f"{o.canon or '(model)'}, {o.cls or 'unknown class'}): the file records neither "
            "their variables' names nor which are trainable; listed by position "
            f"({_join_name(o.canon, '0')}, ...) as params, slots bound by shape only. Import "
            "the module registering the class (keras.saving.register_keras_serializable) and "
            "call surgeon from Python to name them as Keras does"
            + ("" if model_json is not None else " (with --model)"))
        return None

    # -- reader protocol (entries, entry: EntryIndex) --------------------------------
    def _dataset(self, key) -> h5py.Dataset:
        ds = self._root[key]
        return self._files[ds.file_index][ds.path]

    def read(self, name) -> np.ndarray:
        e = self.entry(name)
        try:
            arr = self._read_raw(self._root[e.key])
            if arr is not None:
                return _bf16(arr, e.dtype == "bfloat16")
            return to_numpy(self._dataset(e.key), e.dtype == "bfloat16")
        except DAMAGE as exc:
            raise FormatError(f"{self.label}: cannot read {name}: {first_line(exc)}") from None

    def _read_raw(self, ds):
        """A plain dataset's value read with ``preadv`` at its offset, bypassing HDF5 (same
        bytes, ~no per-tensor cost; any process may do it: the fd is per process), or None
        when it needs HDF5 (``h5tree.raw_extent``) or its file is not a plain file/member."""
        src = None if ds.raw is None else self._raw_source(ds.file_index)
        return None if src is None else rawread.read_extent(src, ds)

    def _raw_source(self, index):
        """``(fd, base offset, size)`` of file ``index`` for raw reads, opened once per
        process (a forked pool worker opens its own), or None."""
        key = (os.getpid(), index)
        if key not in self._raw_fds:
            self._raw_fds[key] = rawread.open_source(self._files[index]) if index < len(self._files) else None
        return self._raw_fds[key]

    def after_fork(self):
        """In a forked worker: fresh HDF5 handles of its own, keeping the parsed structure
        (re-parsing costs ~0.5 ms per object). The inherited handles share file offsets
        with the parent through their file objects, so they are kept (never closed here:
        closing runs HDF5 code on the parent's state) but never used."""
        self._inherited = self._files
        self._files = [open_h5(rawread.same_source(f), self.label) for f in self._files]

    def read_chunks(self, name, max_bytes=8 << 20):
        """Yield ``name``'s values as slices along axis 0 of at most ~``max_bytes`` each
        (one row at least), so large tensors can be streamed (used by diff/audit)."""
        e = self.entry(name)
        bf16 = e.dtype == "bfloat16"
        try:
            ds = self._dataset(e.key)
            check_dataset(ds)
            if ds.ndim == 0 or ds.shape[0] == 0 or ds.nbytes <= max_bytes:
                yield to_numpy(ds, bf16)
                return
            step = max(1, int(max_bytes // max(1, ds.nbytes // ds.shape[0])))
            for i in range(0, ds.shape[0], step):
                arr = ds[i:i + step]
                if bf16:
                    import ml_dtypes
                    arr = arr.view(ml_dtypes.bfloat16)
                yield arr
        except DAMAGE as exc:
            raise FormatError(f"{self.label}: cannot read {name}: {first_line(exc)}") from None

    def metadata(self) -> dict:
        return {"format": self.format, "path": str(self.path),
                "optimizer": self.optimizer.to_json() if self.optimizer else None,
                "notes": list(self.notes)}

    def structure(self) -> Node:
        return self._root

    def read_key(self, key) -> np.ndarray:
        """Raw value of any dataset by its storage path (e.g. ``surgeon/masks/...`` extras)."""
        return np.asarray(self._dataset(key)[()])

    def close(self):
        for f in self._files:
            try:
                f.close()
            except Exception:  # closing twice or after a failed open
                pass
        self._files = []
        fds, self._raw_fds = getattr(self, "_raw_fds", {}), {}
        for (pid, _), src in fds.items():
            if src is not None and pid == os.getpid():
                os.close(src[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_model_json(model) -> dict | None:
    """The model config from ``--model``: a ``.keras`` file or a ``config.json``."""
    if model is None:
        return None
    model = Path(model)
    if not model.exists():
        raise SurgeonError(f"{model}: no such file (--model expects a .keras file or config.json)")
    if model.suffix == ".keras":
        from .keras_zip import read_zip_json
        return read_zip_json(model, "config.json")
    if model.suffix in (".h5", ".hdf5"):  # a full-model legacy .h5 keeps its config
        return _legacy_config(model)
    try:
        return json.loads(model.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{model}: not a JSON model config: {exc}") from None


def _legacy_config(path):
    from .legacy_h5 import LegacyH5Reader
    with LegacyH5Reader(path, [open_h5(path, str(path))]) as legacy:
        return legacy.model_config if legacy._own_config else None


def _fitted(reader, model):
    """``reader`` when ``model`` fits its weights; else closed, with the first mismatch."""
    from . import model_fit
    try:
        model_fit.check(reader, model, getattr(reader, "_objects", None))
    except BaseException:
        reader.close()
        raise
    return reader


def open_weights_h5(path, model=None):
    return _fitted(KerasH5Reader(path, [open_h5(path, str(path))], read_model_json(model)), model)


def open_sharded(path, model=None):
    path = Path(path)
    try:
        index = json.loads(path.read_text())
        names = sorted({f for files in index["weight_map"].values()
                        for f in (files if isinstance(files, list) else [files])})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{path}: not a Keras sharded weights index: {exc}") from None
    files = []
    try:
        for n in names:
            files.append(open_h5(path.with_name(n), str(path.with_name(n))))
    except SurgeonError:
        for f in files:
            f.close()
        raise
    r = KerasH5Reader(path, files, read_model_json(model))
    r.format = "keras-weights-sharded"
    r.shard_names = names
    return _fitted(r, model)


class KerasH5Writer:
    """Writes a copy of a Keras H5 reader's files with some tensors replaced.

    Every group, attr and untouched dataset is copied as stored (bit-identical).
    """

    def __init__(self, reader: KerasH5Reader, targets, files=None):
        self.reader = reader
        self.targets = [Path(t) for t in targets]
        if files is None:
            self._tmps, self._out = [], []
            try:
                for t in self.targets:
                    self._tmps.append(atomic.temp_path(t))
                    self._out.append(h5py.File(self._tmps[-1], "w"))
            except OSError as exc:
                self.abort()
                raise WriteError(f"cannot write {self.targets[0]}: {first_line(exc)}") from None
        else:  # write into open file objects (e.g. straight into a zip member)
            self._tmps = []
            self._out = [h5py.File(f, "w") for f in files]
        self._written = set()

    def write(self, name, array):
        e = self.reader.entry(name)
        for key in (e.key, *getattr(self.reader, "mirrors", {}).get(e.key, ())):
            self._write_key(key, array)

    def _write_key(self, key, array):
        src = self.reader._root[key]
        out = self._out[src.file_index]
        if src.path in out:
            del out[src.path]
        arr = np.asarray(array)
        bf16 = arr.dtype.name == "bfloat16"
        try:
            # bfloat16 as Keras stores it (h5py opaque 2-byte type); a uint16 view breaks Keras' load
            ds = out.create_dataset(src.path, data=arr)
            for k, v in src.attrs.items():
                if k != "dtype":
                    ds.attrs[k] = v
            if bf16:
                ds.attrs["dtype"] = "bfloat16"
        except OSError as exc:  # disk full, quota, file size limit: the caller aborts
            raise WriteError(f"cannot write {self.targets[0]}: {first_line(exc)}") from None
        self._written.add(key)

    def copy_from(self, reader, name):
        self.write(name, reader.read(name))

    def add_extra(self, path, array):
        """Store an extra dataset outside Keras' tree (e.g. ``surgeon/masks/<name>``) in the
        first file; Keras ignores it when loading. Replaces a copied one of the same path."""
        out = self._out[0]
        if path in out:
            del out[path]
        out.create_dataset(path, data=array)
        self._written.add(path)

    def _copy_rest(self):
        """Recreate every source group (with its attrs, per file) and copy unwritten datasets."""
        for src, out in zip(self.reader._files, self._out):
            if out is None:  # a file another process writes (one shard per Ray task)
                continue
            for k in src.attrs.keys():
                out.attrs[k] = src.attrs[k]
            groups = []
            src.visititems(lambda n, o: groups.append(n) if isinstance(o, h5py.Group) else None)
            for name in groups:
                g = out.require_group(name)
                for k, v in src[name].attrs.items():
                    g.attrs[k] = v

        def visit(node: Node):
            for key, item in node.items.items():
                if isinstance(item, Node):
                    visit(item)
                elif item.path not in self._written and self._out[item.file_index] is not None:
                    src_file = self.reader._files[item.file_index]
                    parent = self._out[item.file_index].require_group(node.path or "/")
                    src_file.copy(src_file[item.path], parent, name=key)

        visit(self.reader._root)

    def finalize(self):
        try:
            self._copy_rest()
            for out in self._out:
                out.close()
            for tmp, target in zip(self._tmps, self.targets):
                atomic.commit(tmp, target)
        except OSError as exc:
            self.abort()
            raise WriteError(f"cannot write {self.targets[0]}: {first_line(exc)}") from None
        return self.targets[0]

    def abort(self):
        for out in self._out:
            try:
                out.close()
            except Exception:
                pass
        atomic.discard(*self._tmps)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.abort()
