"""Writer for Keras 3 sharded weights (``<base>.weights.json`` + ``<base>_0000k.weights.h5``)."""
from __future__ import annotations

import json
from pathlib import Path

from surgeon.core import atomic
from .keras_h5 import KerasH5Writer


def shard_names(reader, target) -> dict:
    """``{input shard name: output shard name}``: shards named after the target's base name."""
    target = Path(target)
    base = target.name[: -len(".weights.json")] if target.name.endswith(".weights.json") else target.stem
    return {old: f"{base}_{i:05d}.weights.h5" for i, old in enumerate(reader.shard_names)}


def index_json(reader, rename) -> str:
    """The input's index with its weight map pointing at the renamed shards."""
    index = json.loads(Path(reader.path).read_text())
    wm = {}
    for k, files in index.get("weight_map", {}).items():
        if isinstance(files, list):
            wm[k] = [rename.get(f, f) for f in files]
        else:
            wm[k] = rename.get(files, files)
    index["weight_map"] = wm
    return json.dumps(index, indent=4)


def publish_shards(reader, rename, folder, target):
    """Move the shards written in ``folder`` (named by ``rename``, e.g. by tasks writing one
    shard each) beside ``target``, then write the index ``target`` last: the commit point."""
    target = Path(target)
    for name in (rename[n] for n in reader.shard_names):
        atomic.commit(Path(folder) / name, target.with_name(name))
    tmp = atomic.temp_path(target)
    tmp.write_text(index_json(reader, rename))
    atomic.commit(tmp, target)


class ShardedWriter(KerasH5Writer):
    """Shards named after the target's base name; the index's weight map follows."""

    def __init__(self, reader, target):
        target = Path(target)
        self.rename = shard_names(reader, target)
        self.index_target = target
        super().__init__(reader, [target.with_name(self.rename[n]) for n in reader.shard_names])

    def _index_json(self) -> str:
        return index_json(self.reader, self.rename)

    def finalize(self):
        text = self._index_json()
        super().finalize()
        tmp = atomic.temp_path(self.index_target)
        tmp.write_text(text)
        atomic.commit(tmp, self.index_target)
        return self.index_target


class OneShardWriter(KerasH5Writer):
    """Writes shard ``index`` of a sharded reader's output only, into ``path`` (no rename:
    the caller commits it with the others). Writes to keys of other shards are ignored, so
    a task can run every group touching its shard; each shard gets the same operations, in
    the same order, as ``ShardedWriter`` gives it."""

    def __init__(self, reader, index, path):
        import h5py
        self.reader, self.index = reader, index
        self.targets, self._tmps = [Path(path)], []
        self._out = [None] * len(reader.shard_names)
        self._out[index] = h5py.File(path, "w")
        self._written = set()

    def _write_key(self, key, array):
        if self.reader._root[key].file_index == self.index:
            super()._write_key(key, array)

    def add_extra(self, path, array):
        if self.index == 0:
            super().add_extra(path, array)

    def close(self):
        """Copy the rest of this shard, close and fsync it."""
        self._copy_rest()
        self._out[self.index].close()
        atomic.fsync_path(self.targets[0])
        return self.targets[0]

    def abort(self):
        try:
            self._out[self.index].close()
        except Exception:
            pass
