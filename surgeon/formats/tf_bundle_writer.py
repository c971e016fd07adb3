"""Lossless write-back of TF bundles (checkpoint prefix, checkpoint directory, SavedModel).

Every key of the source is written again -- the object graph string tensor included --
with ``tf.raw_ops.SaveV2``; tensors are flushed in parts of bounded size and the parts
are merged with ``MergeV2Checkpoints``. Output is assembled in a temporary directory
beside the target and moved into place at ``finalize()``; a SavedModel's other files
(``saved_model.pb``, assets, ...) are copied byte for byte.
"""
from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import numpy as np

from surgeon.core import atomic
from surgeon.core.errors import SurgeonError, WriteError
from .tf_bundle import _one_line, _tf

PART_BYTES = 256 << 20  # flush pending tensors into a part once they exceed this


def _nbytes(value) -> int:
    return len(value) if isinstance(value, bytes) else int(np.asarray(value).nbytes)


class BundleWriter:
    """Writes ``target`` in the format of reader ``like`` with some tensors replaced.

    ``target`` is a prefix (``out/ckpt-1`` or ``out/ckpt-1.index``) when ``like`` was opened
    from a prefix, otherwise a directory (checkpoint directory or SavedModel).
    """

    part_stem = "part"  # the parts' names in the temp directory (Ray tasks: one stem each)

    def __init__(self, like, target):
        self.like = like
        self.kind = like.kind
        target = str(target)
        if self.kind == "prefix" and target.endswith(".index"):
            target = target[: -len(".index")]
        self.target = target
        for path in _output_files(target, self.kind):
            atomic.check_output(path, [like.path])
        parent = os.path.dirname(os.path.abspath(target)) if self.kind == "prefix" \
            else os.path.dirname(os.path.abspath(target.rstrip("/")))
        if not os.path.isdir(parent):
            raise SurgeonError(f"{target}: output directory {parent} does not exist")
        # Named like every surgeon temp (host-pid), so the next successful write of the same
        # target removes what a killed run left behind.
        self._tmp = str(atomic.temp_dir(Path(os.path.abspath(target.rstrip("/")))))
        self._parts, self._pending, self._pending_bytes = [], {}, 0
        self._written = set()
        self._done = False

    # -- writer protocol -------------------------------------------------------------------
    def write(self, name, array):
        arr = np.asarray(array)
        for key in self.like.keys_of(name):
            self._put(key, arr)

    def copy_from(self, reader, name):
        self.write(name, reader.read(name))

    def _put(self, key, value):
        if key in self._pending:
            self._pending_bytes -= _nbytes(self._pending[key])
        self._pending[key] = value
        self._written.add(key)
        self._pending_bytes += _nbytes(value)
        if self._pending_bytes >= PART_BYTES:
            self._flush()

    def _flush(self):
        if not self._pending:
            return
        tf = _tf()
        part = os.path.join(self._tmp, f"{self.part_stem}-{len(self._parts):05d}")
        names = sorted(self._pending)
        try:
            tf.raw_ops.SaveV2(prefix=part, tensor_names=names, shape_and_slices=[""] * len(names),
                              tensors=[tf.constant(self._pending[k]) for k in names])
        except Exception as exc:  # noqa: BLE001
            self.abort()
            raise WriteError(f"cannot write {self.target}: {_one_line(exc)}") from None
        self._parts.append(part)
        self._pending, self._pending_bytes = {}, 0

    def finalize(self):
        return self._publish(self._complete)

    def _complete(self):
        """Write every key not written yet (the input's value), then merge and assemble."""
        for key in self.like.keys:
            if key not in self._written:
                self._put(key, self.like.read_key(key))
        self._flush()
        return self._assemble(self._merge())

    def finalize_parts(self, parts):
        """Publish a bundle made of ``parts`` (prefixes in the temp directory, e.g. written
        by Ray tasks, in the order their data files get): merged by ``MergeV2Checkpoints``
        (data files renamed to ``data-0000k-of-0000n``, one index written), then moved
        into place as ``finalize`` does."""
        self._parts, self._pending = list(parts), {}
        return self._publish(lambda: self._assemble(self._merge()))

    def _publish(self, build):
        """``build()``: the published output's path; on failure the temp directory is
        removed and an OSError becomes a one-line WriteError."""
        try:
            out = build()
        except SurgeonError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise WriteError(f"cannot write {self.target}: {exc}") from None
        self._done = True
        return out

    def _merge(self):
        tf = _tf()
        rel = {"dir": os.path.basename(self.like.prefix), "prefix": "bundle",
               "saved-model": os.path.join("variables", "variables")}[self.kind]
        dest = os.path.join(self._tmp, "out", rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=self._parts, destination_prefix=dest,
                                          delete_old_dirs=False)
        except Exception as exc:  # noqa: BLE001
            raise WriteError(f"cannot write {self.target}: merging bundle parts failed: "
                             f"{_one_line(exc)}") from None
        for p in self._parts:
            for f in Path(self._tmp).glob(os.path.basename(p) + ".*"):
                f.unlink()
        return dest

    def _assemble(self, bundle):
        out = os.path.join(self._tmp, "out")
        if self.kind == "prefix":
            return self._place_prefix(bundle)
        if self.kind == "dir":
            base = os.path.basename(self.like.prefix)
            with open(os.path.join(out, "checkpoint"), "w") as f:
                f.write(f'model_checkpoint_path: "{base}"\n'
                        f'all_model_checkpoint_paths: "{base}"\n')
        else:
            src = Path(self.like.saved_model_dir)
            for item in src.iterdir():
                if item.name == "variables":
                    continue
                dst = os.path.join(out, item.name)
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst)
        _fsync_tree(out)
        return self._place_dir(out)

    def _place_prefix(self, bundle):
        """Move data shards, then the index (the commit point), onto the target prefix."""
        folder, base = os.path.split(bundle)
        new = sorted(f for f in os.listdir(folder) if f.startswith(base + "."))
        data = [f for f in new if not f.endswith(".index")]
        for f in data + [base + ".index"]:
            src = os.path.join(folder, f)
            atomic.check_output(self.target + f[len(base):])
            atomic.publish_mode(src, self.target + f[len(base):])
            _fsync(src)
            os.replace(src, self.target + f[len(base):])
        keep = {os.path.abspath(self.target + f[len(base):]) for f in data}
        for stale in Path(os.path.dirname(os.path.abspath(self.target))).glob(
                os.path.basename(self.target) + ".data-*"):
            if os.path.abspath(str(stale)) not in keep:
                stale.unlink()
        shutil.rmtree(self._tmp, ignore_errors=True)
        atomic.clean_stale(Path(os.path.abspath(self.target)))
        return self.target + ".index"

    def _place_dir(self, out):
        target = self.target.rstrip("/")
        atomic.check_output(target)
        atomic.publish_mode(out, target)
        old = None
        if os.path.lexists(target):
            if not os.path.isdir(target):
                raise WriteError(f"{target}: exists and is not a directory")
            old = os.path.join(self._tmp, "old")
            os.replace(target, old)
        os.replace(out, target)
        shutil.rmtree(self._tmp, ignore_errors=True)
        atomic.clean_stale(Path(os.path.abspath(target)))
        return target

    def abort(self):
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None and not self._done:
            self.abort()


def _output_files(target, kind):
    """What writing ``target`` replaces: a prefix's index and data files, or the directory."""
    if kind != "prefix":
        return [target.rstrip("/")]
    folder, base = os.path.split(os.path.abspath(target))
    data = sorted(Path(folder).glob(glob.escape(base) + ".data-*")) if os.path.isdir(folder) else []
    return [target, target + ".index", *map(str, data)]


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root):
    for folder, _, files in os.walk(root):
        for f in files:
            _fsync(os.path.join(folder, f))
