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

import numpy as np

from surgeon.core.fastio import crc32, start_writeback

WRITEBACK_EVERY = 1 << 25  # start the writeback of what was written every 32 MB
PIECE = 1 << 22  # old bytes read back, XORed and CRCed 4 MB at a time


def regions_of(h5, reader, name, base):
    """``[(absolute offset, nbytes, dtype str, shape)]`` of ``name``'s datasets (its mirrors
    too) in the open clone ``h5``, or None when one is chunked, compact, filtered or not
    allocated. The clone is a byte copy of the reader's file, so the reader's snapshot
    (``h5tree.raw_extent``) gives the offsets without asking HDF5; else HDF5's low-level
    calls (a few microseconds per dataset)."""
    e = reader.entry(name)
    out = []
    for key in (e.key, *getattr(reader, "mirrors", {}).get(e.key, ())):
        region = _known(reader, key, base) or _asked(h5, reader, key, base)
        if region is None:
            return None
        out.append(region)
    return out


def _known(reader, key, base):
    ds = reader._root[key]
    raw = getattr(ds, "raw", None)
    if raw is None:
        return None
    return (base + raw[0], raw[1], ds.dtype.str, tuple(ds.shape))


def _asked(h5, reader, key, base):
    from h5py import h5d
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
    return (base + off, size, dt.str, shape)


class RawSink:
    """Writes arrays at known regions of ``path`` (picklable: path, regions, flags).

    ``background()``: large tensors are then written by a thread (``_Behind``) while the
    caller computes the next ones; ``put`` returns the CRC changes finished so far and
    ``finish`` the rest (their order does not matter). The bytes written are the same."""

    def __init__(self, path, regions=None, crc=False):
        self.path, self.regions, self.crc = str(path), dict(regions or {}), crc
        self._fd = None
        self._old = None  # scratch for the old bytes (reused: no page faults per tensor)
        self._dirty = 0  # bytes written since the last start of their writeback
        self._behind = None

    def __getstate__(self):
        return {"path": self.path, "regions": self.regions, "crc": self.crc, "_fd": None, "_old": None,
                "_dirty": 0, "_behind": None}

    def background(self):
        """Write tensors of ``BEHIND_MIN`` bytes or more in a background thread."""
        from .rawbehind import Behind
        if self._behind is None:
            self._behind = Behind(self)
        return self

    def finish(self):
        """Wait for the background writes; their CRC changes (an error of theirs raised)."""
        return self._behind.finish() if self._behind is not None else []

    def put(self, name, array):
        """Write ``array`` as ``name``; ``[(linear crc, end offset)]`` (empty without CRC
        tracking), or None when ``name`` has no raw region or the bytes do not fit it.
        With CRC tracking, bytes that did not change are not rewritten."""
        regs = self.regions.get(name)
        if not regs:
            return None
        arr = np.asarray(array)
        for _, n, dt, shape in regs:
            if arr.shape != shape or arr.nbytes != n or arr.dtype.itemsize != np.dtype(dt).itemsize:
                return None
            if arr.dtype.str != dt and not (arr.dtype.name == "bfloat16" or np.dtype(dt).kind == "V"):
                return None
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR)
        if self._behind is not None:
            return self._behind.put(data, regs)
        return self.put_bytes(data, regs, self._scratch)

    def put_bytes(self, data, regs, scratch):
        """Write the bytes ``data`` at each region of ``regs``; the CRC changes."""
        out = []
        for off, n, _, _ in regs:
            if self.crc:
                linear = _linear_change(self._fd, data, off, n, scratch)
                if linear is None:
                    continue
                out.append((linear, off + n))
            _pwrite_all(self._fd, memoryview(data), off)
            self._written(n)
        return out

    def _written(self, n):
        """Start the disk writing what was written every ``WRITEBACK_EVERY`` bytes (the
        whole file's dirty pages, asynchronously), so that the final ``fsync`` finds
        little left: on a full rewrite the disk works while the next tensors compute."""
        self._dirty += n
        if self._dirty >= WRITEBACK_EVERY:
            self._dirty = 0
            start_writeback(self._fd, 0, 0)

    def _scratch(self, n):
        if self._old is None or self._old.size < n:
            self._old = np.empty(n, np.uint8)
        return self._old[:n]

    def close(self):
        """Close the file (background writes stopped first: call ``finish`` to keep them)."""
        if self._behind is not None:
            self._behind.stop()
            self._behind = None
        self._old = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _linear_change(fd, data, off, n, scratch):
    """The CRC's linear part of (old XOR new) over the ``n`` bytes at ``off`` (new: ``data``),
    or None when no byte changes. ``PIECE`` bytes at a time (a small scratch buffer that
    stays in cache), the pieces' parts shifted and XORed together."""
    linear, changed = 0, False
    for start in range(0, n, PIECE):
        k = min(PIECE, n - start)
        diff = scratch(k)
        _pread_all(fd, diff, off + start)
        np.bitwise_xor(diff, data[start:start + k], out=diff)
        if diff[:4096].any() or diff.any():  # (a changed piece mostly shows it in 4 kB)
            lin = crc32(diff, 0xFFFFFFFF) ^ 0xFFFFFFFF  # register starts and ends unxored
            linear = _shift(linear, k) ^ lin if changed else lin
            changed = True
        elif changed:
            linear = _shift(linear, k)
    return linear if changed else None


def _shift(linear, k):
    from .keras_patch import crc_shift
    return crc_shift(linear, k)


def _pread_all(fd, buf, off):
    got = 0
    while got < buf.size:
        k = os.preadv(fd, [buf[got:]], off + got)
        if k <= 0:
            raise OSError(f"short read at offset {off + got} of the output")
        got += k


def _pwrite_all(fd, data, off):
    while len(data):
        k = os.pwrite(fd, data, off)
        data, off = data[k:], off + k
