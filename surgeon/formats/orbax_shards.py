"""Orbax output written by several processes (one Ray task each), as a multi-host Orbax save.

Each task writes its arrays with ``OrbaxShardWriter``: in an OCDBT checkpoint, into its
own database ``<item>/ocdbt.process_<k>/`` (what each host of a multi-host Orbax save
writes); with per-array zarr (``use_ocdbt=False``), one directory per array in the item,
which needs no merge. The driver then merges the per-process databases into the item's
root manifest exactly as Orbax does (``orbax.checkpoint._src.serialization.ocdbt_utils.
merge_ocdbt_per_process_files``: every child database copied by
``experimental_copy_range_to`` into the parent in one atomic transaction; the values stay
in the children's data files, which the root manifest references), then writes the
metadata (copied from the input with the layout, as ``OrbaxWriter`` does) and publishes
the whole through ``OrbaxWriter.finalize`` (one rename).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from surgeon.core.errors import WriteError
from . import orbax_layout as lay
from .orbax_writer import OrbaxWriter, one_line

PROCESS_PREFIX = "ocdbt.process_"  # orbax ocdbt_process_spec.PROCESS_PREFIX
CONFIG = {"compression": {"id": "zstd"}}  # OrbaxWriter's database config


def process_dir(item, index) -> Path:
    """The database directory task ``index`` writes in item ``item``."""
    return Path(item) / f"{PROCESS_PREFIX}{int(index)}"


class OrbaxShardWriter(OrbaxWriter):
    """Writes some arrays of ``like``'s output into item directory ``item`` (the driver's
    ``OrbaxWriter`` temp item) as process ``index``; ``close()`` ends the task's part.

    A retried task starts afresh: what an earlier attempt of the same index wrote is
    removed first (its database, or the arrays it is asked to write again)."""

    def __init__(self, like, item, index):
        self.like, self.target = like, Path(item)
        self.ts = lay.require_tensorstore()
        self._item, self._done, self._written = Path(item), False, set()
        self._db = process_dir(item, index)
        self._src_kv = None
        if like.store.ocdbt:
            shutil.rmtree(self._db, ignore_errors=True)
            self._db.mkdir()
        self._kv = self._open_kv() if like.store.ocdbt else None

    def _open_kv(self):
        spec = {"driver": "ocdbt", "base": f"file://{self._db}/", "config": CONFIG}
        return self.ts.KvStore.open(spec).result()

    def _kvspec(self, key) -> dict:
        if self.like.store.ocdbt:
            return {"driver": "ocdbt", "base": f"file://{self._db}/", "path": f"{key}/"}
        shutil.rmtree(self._item / key, ignore_errors=True)  # a retried task's earlier array
        return {"driver": "file", "path": f"{self._item}/{key}/"}

    def copy_key(self, key) -> None:
        """Copy array ``key`` of the input as stored (no decoding)."""
        if not self.like.store.ocdbt:
            shutil.rmtree(self._item / key, ignore_errors=True)
        self._copy_raw(key)

    def close(self) -> list:
        """End this task's writes; the keys it wrote."""
        self._kv = self._src_kv = None
        self._done = True
        return sorted(self._written)

    def abort(self):
        self._kv = self._src_kv = None  # the driver removes the whole temp directory

    def finalize(self):  # a task never publishes: the driver does
        raise TypeError("OrbaxShardWriter: call close(); the driver publishes")


def merge_processes(writer: OrbaxWriter, indices) -> None:
    """Merge the per-process databases ``indices`` of ``writer``'s temp item into its root
    manifest (Orbax' own merge, see the module docstring); nothing to do for zarr."""
    if writer.like.store.ocdbt:
        _merge(writer, indices)
    writer._written.update(leaf.key for leaf in writer.like.leaves)  # finalize copies nothing


def _merge(writer, indices):
    ts = writer.ts
    try:
        ctx = ts.Context()  # one context: TensorStore copies ranges within one only
        writer._kv = None
        parent = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{writer._item}/",
                                  "config": CONFIG}, context=ctx).result()
        txn = ts.Transaction(atomic=True)
        for k in sorted(indices):
            db = process_dir(writer._item, k)
            child = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{db}/"}, context=ctx).result()
            child.experimental_copy_range_to(parent.with_transaction(txn)).result()
        txn.commit_async().result()
    except Exception as exc:  # TensorStore: ValueError with a status text
        raise WriteError(f"cannot write {writer.target}: merging the tasks' OCDBT databases "
                         f"failed: {one_line(exc)}") from None
