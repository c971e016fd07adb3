"""Raw writes into a cloned H5 (or a cloned ``.keras``' weights member): a tensor whose
datasets are contiguous and unfiltered is written with ``pwrite`` at its byte offset,
bypassing HDF5 (no per-write library overhead, and any process may do it: the pool
executor's workers write their tensors themselves, distinct byte ranges of one file).

For a ``.keras`` member the CRC-32 must follow: each write reports the linear CRC of the
bytes it changed (old XOR new) and where that change ends; whoever owns the member's CRC
shifts it by the bytes after it (``shift``) and XORs it in, in any order (CRC-32 is
affine). HDF5 keeps no copy of these bytes: its sieve buffer is per dataset, and the
writer never reads or writes these datasets through h5py.
"""
from __future__ import annotations

import os
import zlib

import numpy as np


def regions_of(h5, reader, name, base):
    """``[(absolute offset, nbytes, dtype str, shape)]`` of ``name``'s datasets (its mirrors
    too) in the open clone ``h5``, or None when one is chunked, compact, filtered or not
    allocated. (HDF5's low-level calls: a few microseconds per dataset.)"""
    from h5py import h5d
    e = reader.entry(name)
    out = []
    for key in (e.key, *getattr(reader, "mirrors", {}).get(e.key, ())):
        dsid = h5d.open(h5.id, reader._root[key].path.encode("utf-8", "surrogateescape"))
        plist = dsid.get_create_plist()
        if plist.get_layout() != h5d.CONTIGUOUS or plist.get_nfilters():
            return None
        off, dt, shape = dsid.get_offset(), dsid.dtype, tuple(dsid.shape)
        size = dsid.get_storage_size()
        n = dt.itemsize
        for d in shape:
            n *= int(d)
        if off is None or dt.hasobject or size != n:
            return None
        out.append((base + off, size, dt.str, shape))
    return out


class RawSink:
    """Writes arrays at known regions of ``path`` (picklable: path, regions, flags)."""

    def __init__(self, path, regions=None, crc=False):
        self.path, self.regions, self.crc = str(path), dict(regions or {}), crc
        self._fd = None

    def __getstate__(self):
        return {"path": self.path, "regions": self.regions, "crc": self.crc, "_fd": None}

    def put(self, name, array):
        """Write ``array`` as ``name``; ``[(linear crc, end offset)]`` (empty without CRC
        tracking), or None when ``name`` has no raw region or the bytes do not fit it."""
        regs = self.regions.get(name)
        if not regs:
            return None
        arr = np.asarray(array)
        data = None
        for _, n, dt, shape in regs:
            if arr.shape != shape or arr.nbytes != n or arr.dtype.itemsize != np.dtype(dt).itemsize:
                return None
            if arr.dtype.str != dt and not (arr.dtype.name == "bfloat16" or np.dtype(dt).kind == "V"):
                return None
        data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR)
        out = []
        for off, n, _, _ in regs:
            if self.crc:
                old = np.frombuffer(os.pread(self._fd, n, off), np.uint8)
                diff = np.bitwise_xor(old, np.frombuffer(data, np.uint8))
                if diff.any():
                    out.append((zlib.crc32(diff, 0xFFFFFFFF) ^ 0xFFFFFFFF, off + n))
            _pwrite_all(self._fd, data, off)
        return out

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pwrite_all(fd, data, off):
    while len(data):
        k = os.pwrite(fd, data, off)
        data, off = data[k:], off + k
