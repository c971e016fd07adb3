"""A structure-only snapshot of one or more HDF5 files (groups, attrs, dataset metadata).

Sharded Keras weights spread one logical tree over several files; the snapshot merges
them so the layout code sees one tree. No tensor data is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import h5py
from h5py import h5a, h5d, h5o, h5t

from .h5heap import HeapGuard

# Attribute types a Keras file uses. Anything else (variable-length sequences, references,
# compounds, opaque blobs) is refused before reading: libhdf5 can crash on corrupt ones.
ATTR_CLASSES = (h5t.INTEGER, h5t.FLOAT, h5t.STRING, h5t.ENUM)
MAX_ATTR_BYTES = 64 * 2**20
SKIP = object()


@dataclass
class DS:
    """Metadata of one dataset: where it lives and what it holds."""

    path: str
    shape: tuple
    dtype: object
    attrs: dict
    file_index: int = 0
    raw: tuple | None = None  # (offset in its file, nbytes) when readable as plain bytes (raw_extent)


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


def _attr_value(obj, key, guard):
    """Read one attr after checking its type and size; ``SKIP`` for types Keras never writes.

    Variable-length sequences, references, compounds and opaque blobs (e.g. pickled
    bytes) are never read: libhdf5 can crash on corrupt ones, and nothing is unpickled.
    """
    aid = h5a.open(obj.id, key.encode("utf-8", "surrogateescape"))
    tid = aid.get_type()
    cls = tid.get_class()
    vlen = cls == h5t.STRING and tid.is_variable_str()
    if cls not in ATTR_CLASSES or (vlen and (tid.get_cset() not in (h5t.CSET_ASCII, h5t.CSET_UTF8)
                                             or tid.get_strpad() not in (0, 1, 2))):
        return SKIP
    count = 1
    for d in aid.shape or ():
        count *= int(d)
    if count * (16 if vlen else tid.get_size()) > MAX_ATTR_BYTES:
        raise ValueError(f"attr {key!r} of {obj.name} declares a shape of {aid.shape}")
    if vlen and guard is not None:
        guard.check_object(h5o.get_info(obj.id).addr)
    v = obj.attrs[key]
    return v.decode() if isinstance(v, bytes) else v


def _attrs(obj, guard=None):
    out = {}
    for k in obj.attrs.keys():
        v = _attr_value(obj, k, guard)
        if v is not SKIP:
            out[k] = v
    return out


def _ensure(root, path):
    node = root
    for part in [p for p in path.split("/") if p]:
        node = node.items.setdefault(part, Node(f"{node.path}/{part}".strip("/")))
    return node


def snapshot(files) -> Node:
    """Merge the structure of ``files`` (open h5py.File objects) into one Node tree.

    One low-level ``H5Ovisit`` lists every object with its type and attribute count;
    attributes are read only where there are some, and datasets are opened low-level
    (h5py's high-level objects cost ~1 ms each: seconds on a ResNet50's 1,100 objects)."""
    root = Node()
    for index, f in enumerate(files):
        with _guard(f) as guard:
            root.attrs.update(_attrs(f, guard))
            found = []
            h5o.visit(f.id, lambda name, info: found.append((name, info.type, info.num_attrs)),
                      info=True)
            for key, kind, nattrs in found:
                name = f._d(key)
                parent, _, leaf = name.rpartition("/")
                if kind == h5o.TYPE_DATASET:
                    dsid = h5d.open(f.id, key)
                    attrs = _attrs(f[name], guard) if nattrs else {}
                    _ensure(root, parent).items[leaf] = DS(name, tuple(dsid.shape), dsid.dtype, attrs,
                                                          index, raw_extent(dsid))
                else:
                    node = _ensure(root, name)
                    if nattrs:
                        node.attrs.update(_attrs(f[name], guard))
    return root


RAW_CLASSES = (h5t.INTEGER, h5t.FLOAT)


def raw_extent(dsid):
    """``(offset, nbytes)`` of a dataset whose value is exactly its stored bytes (contiguous,
    unfiltered, allocated, numbers or 2-byte opaque/bfloat16, as large as its shape says),
    else None (read through h5py)."""
    try:
        tid = dsid.get_type()
        cls, size = tid.get_class(), tid.get_size()
        if not (cls in RAW_CLASSES or (cls == h5t.OPAQUE and size == 2)) or dsid.dtype.itemsize != size:
            return None
        plist = dsid.get_create_plist()
        if plist.get_layout() != h5d.CONTIGUOUS or plist.get_nfilters():
            return None
        n = size
        for d in dsid.shape or ():
            n *= int(d)
        off = dsid.get_offset()
        if off is None or n == 0 or dsid.get_storage_size() != n:
            return None
        return (int(off), n)
    except (ValueError, TypeError, KeyError, RuntimeError, OSError):
        return None


class _guard:
    """A HeapGuard reading ``f``'s raw bytes: its path, or the file object it was opened on
    (``open_h5`` records it as ``f.surgeon_source``)."""

    def __init__(self, f):
        self._own = None
        source = getattr(f, "surgeon_source", None)
        if source is None or isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
            source = self._own = open(source if source is not None else f.filename, "rb")
        self.guard = HeapGuard(source, f.id.get_filesize(), f.userblock_size)

    def __enter__(self):
        return self.guard

    def __exit__(self, *exc):
        if self._own is not None:
            self._own.close()


# Dataset types surgeon decodes: numbers, bool (enum), bfloat16 (opaque, 2 bytes).
DATA_CLASSES = (h5t.INTEGER, h5t.FLOAT, h5t.ENUM, h5t.OPAQUE)
MAX_COMPRESSION = 2000  # gzip cannot exceed ~1032:1; more means a lying header


def check_dataset(ds: h5py.Dataset) -> None:
    """Refuse (ValueError) a dataset whose bytes cannot hold its declared shape, before any
    memory is allocated for it, and types surgeon never decodes (objects, pickles, refs)."""
    tid = ds.id.get_type()
    cls = tid.get_class()
    if cls not in DATA_CLASSES or (cls == h5t.OPAQUE and tid.get_size() != 2):
        raise ValueError(f"{ds.name}: unsupported tensor type (HDF5 class {cls})")
    count = 1
    for d in ds.shape or ():
        count *= int(d)
    need = count * tid.get_size()
    if need == 0:
        return
    stored = ds.id.get_storage_size()
    filesize = ds.file.id.get_filesize()
    filtered = ds.id.get_create_plist().get_nfilters() > 0
    limit = min(stored, filesize) * (MAX_COMPRESSION if filtered else 1)
    if need > limit:
        raise ValueError(f"{ds.name}: declared shape {tuple(ds.shape)} needs {need} bytes but "
                         f"the file stores {stored}")
