"""TensorFlow tensor bundles: ``tf.train.Checkpoint`` / ``CheckpointManager`` directories,
TF1 ``Saver`` checkpoints and SavedModel ``variables/``.

A bundle is ``<prefix>.index`` (a table of tensor metadata) plus
``<prefix>.data-0000k-of-0000n``. TF2 bundles carry a ``TrackableObjectGraph`` under
``_CHECKPOINTABLE_OBJECT_GRAPH`` (names resolved by ``tf_objgraph``); TF1 bundles are
name-based (``tf_v1names``). TensorFlow is imported lazily, only here; tensors are read
one at a time through ``tf.train.load_checkpoint``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from surgeon.core.tf import import_tf, tf_module
from surgeon.core.errors import FormatError, SurgeonError
from .tf_v1names import map_names

GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
TABLE_MAGIC = bytes.fromhex("57fb808b247547db")  # leveldb-style table footer magic


def _tf():
    tf = import_tf()
    return tf


def _one_line(exc) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


# -- locating the bundle -----------------------------------------------------------------
def _state_prefix(directory: Path) -> str | None:
    """The prefix the ``checkpoint`` state file names, resolved relative to ``directory``
    when the recorded path is relative or stale (written on another machine)."""
    state = directory / "checkpoint"
    if not state.exists():
        return None
    m = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', state.read_text(errors="replace"), re.M)
    if not m:
        raise FormatError(f"{state}: no model_checkpoint_path in the checkpoint state file")
    recorded = m.group(1).encode().decode("unicode_escape")
    if not os.path.isabs(recorded):
        return os.path.join(str(directory), recorded)
    base = "" if recorded.endswith("/") else os.path.basename(recorded)
    local = os.path.join(str(directory), base)
    # A copied or moved directory keeps absolute paths to where it was written: prefer
    # the bundle of that name inside this directory.
    return local if os.path.exists(local + ".index") else recorded


def _latest_index(directory: Path) -> str:
    found = sorted(directory.glob("*.index"), key=lambda p: (
        [int(x) for x in re.findall(r"\d+", p.name)], p.name))
    if not found:
        raise FormatError(f"{directory}: directory holds no checkpoint (no .index file)")
    return str(found[-1])[: -len(".index")]


def resolve(path) -> tuple[str, str]:
    """(prefix, kind) for a checkpoint path; kind is ``dir`` or ``prefix``."""
    p = Path(path)
    if p.is_dir():
        prefix = _state_prefix(p) or _latest_index(p)
        kind = "dir"
    else:
        s = str(path)
        m = re.match(r"^(.*)\.(index|data-\d{5}-of-\d{5})$", s)
        prefix = m.group(1) if m else s
        kind = "prefix"
    if not os.path.exists(prefix + ".index"):
        raise FormatError(f"{path}: no checkpoint index {prefix}.index")
    return prefix, kind


def _varint(buf, pos):
    shift = value = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7


def check_files(prefix: str):
    """Fail early (one line, naming the file) on a truncated index or a missing data shard."""
    index = prefix + ".index"
    _tf()
    with open(index, "rb") as f:
        head = f.read(4096)
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 8))
        tail = f.read(8)
    if size < 48 or tail != TABLE_MAGIC:
        raise FormatError(f"{index}: truncated or corrupt checkpoint index (no table footer)")
    try:
        tensor_bundle_pb2 = tf_module("tensorflow.core.protobuf.tensor_bundle_pb2")
        shared, pos = _varint(head, 0)
        unshared, pos = _varint(head, pos)
        vlen, pos = _varint(head, pos)
        header = tensor_bundle_pb2.BundleHeaderProto()
        header.ParseFromString(head[pos + unshared: pos + unshared + vlen])
        n = header.num_shards
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged header
        raise FormatError(f"{index}: corrupt checkpoint index header: {_one_line(exc)}") from None
    for k in range(n):
        shard = f"{prefix}.data-{k:05d}-of-{n:05d}"
        if not os.path.exists(shard):
            raise FormatError(f"{shard}: missing data shard ({k + 1} of {n}) of checkpoint {index}")
    return n


# -- reader ------------------------------------------------------------------------------
class BundleReader:
    """Canonical view of a TF bundle (reader protocol of ``surgeon.open_checkpoint``)."""

    format = "tf-checkpoint"

    def __init__(self, path, prefix, kind, saved_model=None, model=None):
        self.path, self.prefix, self.kind = Path(path), prefix, kind
        from .keras_h5 import read_model_json
        self.model_config = read_model_json(model)
        self.saved_model_dir = saved_model
        self.num_shards = check_files(prefix)
        tf = _tf()
        try:
            self._reader = tf.compat.v1.train.NewCheckpointReader(prefix)
            shapes = self._reader.get_variable_to_shape_map()
            dtypes = self._reader.get_variable_to_dtype_map()
        except Exception as exc:  # noqa: BLE001 - TF raises many error types for bad files
            raise FormatError(f"{prefix}.index: not a readable TensorFlow checkpoint: "
                              f"{_one_line(exc)}") from None
        self.keys = {k: (tuple(int(d) for d in shapes[k]), dtypes[k].name) for k in shapes}
        self.mapping = self._map()
        from surgeon.binding.quantized import mark_by_name
        self.mapping.entries = mark_by_name(self.mapping.entries)
        self._by_name = {e.name: e for e in self.mapping.entries}
        self._read_globals()

    def _map(self):
        if GRAPH_KEY not in self.keys:
            return map_names(self.keys)
        trackable_object_graph_pb2 = tf_module(
            "tensorflow.core.protobuf.trackable_object_graph_pb2")
        from .tf_objgraph import Graph, map_graph
        proto = trackable_object_graph_pb2.TrackableObjectGraph()
        try:
            proto.ParseFromString(self.read_key(GRAPH_KEY))
            graph = Graph(proto, self.keys, self._saved_nodes(), self.model_config)
            mapping = map_graph(graph)
        except SurgeonError:
            raise
        except Exception as exc:  # noqa: BLE001 - DecodeError, bad node ids, ...
            raise FormatError(f"{self.prefix}.index: object graph {GRAPH_KEY} does not parse: "
                              f"{_one_line(exc)}") from None
        return mapping

    def _saved_nodes(self):
        if self.saved_model_dir is None:
            return None
        saved_model_pb2 = tf_module("tensorflow.core.protobuf.saved_model_pb2")
        pb = Path(self.saved_model_dir) / "saved_model.pb"
        sm = saved_model_pb2.SavedModel()
        try:
            sm.ParseFromString(pb.read_bytes())
        except Exception as exc:  # noqa: BLE001
            raise FormatError(f"{pb}: not a readable SavedModel: {_one_line(exc)}") from None
        if not sm.meta_graphs:
            return None
        return sm.meta_graphs[0].object_graph_def.nodes

    def _read_globals(self):
        opt = self.mapping.optimizer
        for e in self.mapping.entries:
            if opt is None or e.role != "optimizer" or e.shape != ():
                continue
            if e.name == "optimizer/iteration":
                opt.iterations = int(self.read(e.name))
            elif e.name == "optimizer/learning_rate":
                opt.learning_rate = float(self.read(e.name))

    # -- reader protocol -------------------------------------------------------------------
    def entries(self):
        return list(self.mapping.entries)

    def entry(self, name):
        try:
            return self._by_name[name]
        except KeyError:
            raise SurgeonError(f"{self.path}: no tensor named {name!r}") from None

    def read_key(self, key):
        try:
            value = self._reader.get_tensor(key)
        except Exception as exc:  # noqa: BLE001
            raise FormatError(f"{self.prefix}: cannot read {key}: {_one_line(exc)}") from None
        return value if isinstance(value, bytes) else np.asarray(value)

    def read(self, name) -> np.ndarray:
        return self.read_key(self.entry(name).key)

    def keys_of(self, name):
        """Every storage key holding the canonical tensor ``name`` (aliases included)."""
        self.entry(name)
        return list(self.mapping.aliases[name])

    def metadata(self) -> dict:
        opt = self.mapping.optimizer
        listed = {k for keys in self.mapping.aliases.values() for k in keys}
        return {"format": self.format, "path": str(self.path), "prefix": self.prefix,
                "optimizer": opt.to_json() if opt else None, "notes": list(self.mapping.notes),
                "object_graph": GRAPH_KEY in self.keys,
                "other_keys": sorted(k for k in self.keys if k not in listed)}

    def close(self):
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_bundle(path, model=None):
    """Open a TF checkpoint (prefix, ``.index`` file or directory with a ``checkpoint`` file)."""
    prefix, kind = resolve(path)
    return BundleReader(path, prefix, kind, model=model)


def open_saved_model(path, model=None):
    """Open the variables of a SavedModel directory, named through its object metadata."""
    d = Path(path)
    prefix = str(d / "variables" / "variables")
    if not os.path.exists(prefix + ".index"):
        raise FormatError(f"{path}: SavedModel has no variables/variables.index")
    r = BundleReader(path, prefix, "saved-model", saved_model=d, model=model)
    r.format = "saved-model"
    return r


from .tf_bundle_writer import BundleWriter  # noqa: E402,F401  (registry entry point)
