"""Writer for Keras 3 sharded weights (``<base>.weights.json`` + ``<base>_0000k.weights.h5``)."""
from __future__ import annotations

import json
from pathlib import Path

from surgeon.core import atomic
from .keras_h5 import KerasH5Writer


class ShardedWriter(KerasH5Writer):
    """Shards named after the target's base name; the index's weight map follows."""

    def __init__(self, reader, target):
        target = Path(target)
        base = target.name[: -len(".weights.json")] if target.name.endswith(".weights.json") else target.stem
        self.rename = {old: f"{base}_{i:05d}.weights.h5" for i, old in enumerate(reader.shard_names)}
        self.index_target = target
        super().__init__(reader, [target.with_name(self.rename[n]) for n in reader.shard_names])

    def _index_json(self) -> str:
        index = json.loads(Path(self.reader.path).read_text())
        wm = {}
        for k, files in index.get("weight_map", {}).items():
            if isinstance(files, list):
                wm[k] = [self.rename.get(f, f) for f in files]
            else:
                wm[k] = self.rename.get(files, files)
        index["weight_map"] = wm
        return json.dumps(index, indent=4)

    def finalize(self):
        text = self._index_json()
        super().finalize()
        tmp = atomic.temp_path(self.index_target)
        tmp.write_text(text)
        atomic.commit(tmp, self.index_target)
        return self.index_target
