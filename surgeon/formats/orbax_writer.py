"""Writing Orbax checkpoints: a new directory shaped like the input, renamed into place.

Untouched arrays are copied as their stored bytes (TensorStore key/value copies inside
OCDBT, plain file copies for per-array zarr): nothing is decoded. Written arrays are
encoded with the source array's zarr metadata (shape/dtype adjusted when an op changed
them). One array is held at a time. The output has one OCDBT database at the item's root
(no ``ocdbt.process_N``): a layout any number of processes restores.

Publication: Orbax's commit marker ``commit_success.txt`` is written last in the output's
checkpoint directory. A local output is built in a temporary directory and renamed into
place (as Orbax does); a kvstore URL (``gs://``...: no rename) is written in place, and the
marker is what makes it a checkpoint (readers skip a directory without it).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from surgeon.core import atomic
from surgeon.core.errors import SurgeonError, WriteError
from . import orbax_layout as lay
from .orbax_kv import COMMIT, KvPath, is_url

ARRAY_PARTS = ("manifest.ocdbt", "d")


def one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _is_array_part(item: Path, child: Path, keys) -> bool:
    n = child.name
    return n in ARRAY_PARTS or n.startswith("ocdbt.process_") or n in keys


def copy_except_item(src, dst, item, keys) -> None:
    """Copy ``src`` into ``dst`` leaving out the arrays of PyTree ``item`` (inside ``src``)
    and the commit marker (the writer writes its own, last)."""
    dst.mkdir(exist_ok=True)
    for child in sorted(src.iterdir(), key=lambda c: c.name):
        if child == item or child.name == COMMIT or (
                src == item and _is_array_part(item, child, keys)):
            continue
        copy_tree(child, dst / child.name)


def copy_tree(src, dst) -> None:
    """Copy a file or directory between local paths and kvstores (``KvPath``)."""
    if isinstance(src, Path) and isinstance(dst, Path):
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst)
        return
    files = src.walk_files() if isinstance(src, KvPath) else (
        [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()] if src.is_dir() else None)
    for rel in ([""] if files is None or (not files and src.is_file()) else files):
        out = dst / rel if rel else dst
        if isinstance(out, Path):
            out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes((src / rel if rel else src).read_bytes())


class OrbaxWriter:
    """Writes an Orbax checkpoint like reader ``like``'s to ``target`` (a new directory).

    ``step``: the step number of the output when the input was a root of steps."""

    def __init__(self, like, target, step=None):
        self.like = like
        self.remote = is_url(target) or isinstance(target, KvPath)
        self.target = lay.location(target) if self.remote else Path(
            os.path.abspath(str(target).rstrip("/")))
        self.ts = lay.require_tensorstore()
        if self._exists(self.target):
            raise SurgeonError(f"{target}: exists; an Orbax checkpoint is written as a new "
                               "directory: remove it or choose another name")
        if not self.remote:
            atomic.check_output(self.target, [] if isinstance(like.path, KvPath) else [like.path])
        elif self.target == like.path:
            raise SurgeonError(f"{target}: is the input; write a new directory")
        # a kvstore has no rename: written in place, published by the commit marker
        self._tmp = self.target if self.remote else atomic.temp_dir(self.target)
        self._done, self._written, self._item = False, set(), None
        try:
            self._item = self._layout(step)
            self._kv = self._open_kv() if like.store.ocdbt else None
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _exists(target) -> bool:
        try:
            return target.exists()
        except OSError as exc:  # a kvstore that cannot be reached
            raise WriteError(str(exc)) from None

    def set_step(self, step: int) -> None:
        """Name the output's step directory ``step`` (when the input was a root of steps)."""
        if self.like.where.root is None or self._item is None:
            return
        old = self._tmp / str(self._step)
        new = self._tmp / str(step)
        if new != old:
            if self.remote:  # not committed yet: move its keys
                copy_tree(old, new)
                old.remove_tree()
            else:
                old.rename(new)
            self._item = new / self._item.relative_to(old)
            self._kv = self._open_kv() if self.like.store.ocdbt else None
            self._step = step

    def set_provenance(self, data: bytes) -> None:
        """The surgery log, a file in the output's step (or item) directory."""
        (self._checkpoint_dir() / lay.PROVENANCE).write_bytes(data)

    def _layout(self, step) -> Path:
        w, keys = self.like.where, {leaf.key for leaf in self.like.leaves}
        if w.step_dir is None:  # a bare item directory
            copy_except_item(w.item, self._tmp, w.item, keys)
            return self._tmp
        self._step = step if step is not None else w.step
        out_step = self._tmp / str(self._step) if w.root else self._tmp
        copy_except_item(w.step_dir, out_step, w.item, keys)
        item = out_step / w.item.relative_to(w.step_dir)
        if item != out_step:
            copy_except_item(w.item, item, w.item, keys)
        return item

    def _open_kv(self):
        spec = {"driver": "ocdbt", "base": lay.kvspec(self._item),
                "config": {"compression": {"id": "zstd"}}}
        return self.ts.KvStore.open(spec, context=lay.kv_context()).result()

    # -- writer protocol --------------------------------------------------------------
    def write(self, name, array):
        e = self.like.entry(name)
        src = self.like._array(e.key)
        leaf = self.like._leaf[e.key]
        array = np.asarray(array)
        if self.like.keras_scalar(leaf):
            array = array.astype(src.dtype.numpy_dtype)  # Keras' Python scalar, as stored
        meta = _metadata(src, array, self.like.store.driver)
        spec = {"driver": self.like.store.driver, "kvstore": self._kvspec(e.key), "metadata": meta,
                "store_data_equal_to_fill_value": True}  # as Orbax: restores refuse missing chunks
        try:
            out = self.ts.open(spec, create=True, open=False, context=lay.kv_context()).result()
            out.write(array).result()
        except Exception as exc:
            raise WriteError(f"cannot write {name} to {self.target}: {one_line(exc)}") from None
        self._written.add(e.key)

    def _kvspec(self, key) -> dict:
        if self.like.store.ocdbt:
            return {"driver": "ocdbt", "base": lay.kvspec(self._item), "path": f"{key}/"}
        return lay.kvspec(self._item, key)

    def copy_from(self, reader, name):
        if reader is not self.like:
            self.write(name, reader.read(name))
            return
        self._copy_raw(self.like.entry(name).key)

    def _copy_raw(self, key):
        try:
            if self.like.store.ocdbt:
                src = self.like.store.kvstore()
                skv = self._src_kv or self.ts.KvStore.open(src, context=lay.kv_context()).result()
                self._src_kv = skv
                prefix = f"{key}/".encode()
                with self.ts.Transaction() as txn:
                    for k in skv.list(self.ts.KvStore.KeyRange(prefix, prefix[:-1] + b"0")).result():
                        self._kv.with_transaction(txn)[k] = skv[k]
            else:
                copy_tree(self.like.where.item / key, self._item / key)
        except Exception as exc:
            raise WriteError(f"cannot copy {key} to {self.target}: {one_line(exc)}") from None
        self._written.add(key)

    _src_kv = None

    def finalize(self):
        try:
            for leaf in self.like.leaves:
                if leaf.key not in self._written:
                    self._copy_raw(leaf.key)
            self._kv = self._src_kv = None
            (self._checkpoint_dir() / COMMIT).write_bytes(
                f"Checkpoint commit was successful to {self.target}".encode())  # last: published
            if not self.remote:
                atomic.commit(self._tmp, self.target)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.target

    def _checkpoint_dir(self):
        """Where Orbax looks for the commit marker: the step directory, else the item."""
        w = self.like.where
        return self._item if w.step_dir is None else (
            self._tmp / str(self._step) if w.root else self._tmp)

    def abort(self):
        self._kv = self._src_kv = None
        if self._done:
            return
        if not self.remote:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        try:  # uncommitted (no marker): readers skip it anyway; clean it up when possible
            self._tmp.remove_tree()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None or not self._done:
            self.abort()


def _metadata(src, array, driver) -> dict:
    """The zarr metadata for ``array``: the source array's, shape and dtype adjusted."""
    meta = src.spec().to_json()["metadata"]
    shape, same = list(array.shape), tuple(array.shape) == tuple(src.shape)
    if same and array.dtype == src.dtype.numpy_dtype:
        return meta
    if driver == "zarr3":
        meta["shape"], meta["data_type"] = shape, array.dtype.name
        meta["chunk_grid"]["configuration"]["chunk_shape"] = shape or []
        for codec in meta.get("codecs", []):
            if codec.get("name") == "sharding_indexed":
                codec["configuration"]["chunk_shape"] = shape or []
        meta["fill_value"] = 0
        return meta
    return {"shape": shape, "chunks": shape or [1], "dtype": array.dtype.str,
            "compressor": meta.get("compressor"), "fill_value": None}
