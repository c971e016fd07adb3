"""A structure-only snapshot of one or more HDF5 files (groups, attrs, dataset metadata).

Sharded Keras weights spread one logical tree over several files; the snapshot merges
them so the layout code sees one tree. No tensor data is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import h5py


@dataclass
class DS:
    """Metadata of one dataset: where it lives and what it holds."""

    path: str
    shape: tuple
    dtype: object
    attrs: dict
    file_index: int = 0


@dataclass
class Node:
    """A group: its attrs, subgroups and datasets, by name."""

    path: str = ""
    attrs: dict = field(default_factory=dict)
    items: dict = field(default_factory=dict)

    def keys(self):
        return self.items.keys()

    def __contains__(self, key):
        return key in self.items

    def __getitem__(self, path):
        node = self
        for part in path.strip("/").split("/"):
            node = node.items[part]
        return node

    def get(self, path, default=None):
        try:
            return self[path]
        except (KeyError, AttributeError):
            return default


def _attrs(obj):
    out = {}
    for k in obj.attrs.keys():
        v = obj.attrs[k]
        out[k] = v.decode() if isinstance(v, bytes) else v
    return out


def _ensure(root, path):
    node = root
    for part in [p for p in path.split("/") if p]:
        node = node.items.setdefault(part, Node(f"{node.path}/{part}".strip("/")))
    return node


def snapshot(files) -> Node:
    """Merge the structure of ``files`` (open h5py.File objects) into one Node tree."""
    root = Node()
    for index, f in enumerate(files):
        root.attrs.update(_attrs(f))

        def visit(name, obj, index=index):
            parent, _, leaf = name.rpartition("/")
            if isinstance(obj, h5py.Dataset):
                _ensure(root, parent).items[leaf] = DS(name, tuple(obj.shape), obj.dtype,
                                                      _attrs(obj), index)
            else:
                _ensure(root, name).attrs.update(_attrs(obj))

        f.visititems(visit)
    return root
