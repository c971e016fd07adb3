"""Check HDF5 global heap collections before libhdf5 reads variable-length strings from them.

Keras stores each layer's ``name`` attr as a variable-length string, whose bytes live in a
global heap collection ("GCOL"). Global heaps carry no checksum, and libhdf5 1.14 loops
forever on a collection holding a zero-sized object and can crash on other damage. So
before reading a vlen attr, surgeon parses the object header that holds it, finds the heap
objects it points to, and walks each collection the way libhdf5 does, refusing anything
that would not make progress or points outside the collection or the file.

Covered: object headers v1 and v2 with compact attribute storage (what h5py and Keras
write). Dense attribute storage (fractal heaps, > 8 attrs with new-format headers) is not
parsed; its attrs are read as is.
"""
from __future__ import annotations

import struct

MAX_BLOCKS = 10_000


class HeapGuard:
    """Validates the heap objects referenced by one file's vlen attrs (results are cached)."""

    def __init__(self, source, filesize: int, base: int = 0):
        self._source, self.filesize, self.base = source, filesize, base
        self._collections = {}
        self._checked = set()

    def _read(self, addr: int, size: int) -> bytes:
        if addr < 0 or size < 0 or addr + size > self.filesize:
            raise ValueError(f"HDF5 address {addr}+{size} lies beyond the end of the file")
        f = self._source
        f.seek(self.base + addr)
        data = f.read(size)
        if len(data) != size:
            raise ValueError(f"HDF5 address {addr}+{size}: short read")
        return data

    def check_object(self, addr: int) -> None:
        """Raise ValueError if a vlen attr of the object header at ``addr`` points at a
        damaged heap collection."""
        if addr in self._checked:
            return
        for body in self._attribute_messages(addr):
            for heap_addr, index, length in _vlen_refs(body):
                objects = self._collection(heap_addr)
                if objects.get(index, -1) < length:
                    raise ValueError(f"global heap at {heap_addr}: no object {index} of "
                                     f"{length} bytes (corrupt heap reference)")
        self._checked.add(addr)

    # -- object headers ----------------------------------------------------------------
    def _attribute_messages(self, addr):
        head = self._read(addr, 16)
        if head[:4] == b"OHDR":
            return self._v2_messages(addr)
        if head[0] != 1:
            raise ValueError(f"object header at {addr}: unknown version {head[0]}")
        size = struct.unpack("<I", head[8:12])[0]
        blocks, out, seen = [(addr + 16, size)], [], set()
        while blocks:
            start, length = blocks.pop(0)
            if start in seen or len(seen) > MAX_BLOCKS:
                raise ValueError(f"object header at {addr}: continuation loop")
            seen.add(start)
            data, p = self._read(start, length), 0
            while p + 8 <= len(data):
                mtype, msize = struct.unpack("<HH", data[p:p + 4])
                body = data[p + 8:p + 8 + msize]
                p += 8 + msize
                out.extend(self._dispatch(mtype, body, blocks))
        return out

    def _v2_messages(self, addr):
        head = self._read(addr, 24)
        flags = head[5]
        p = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        width = 1 << (flags & 3)
        head = self._read(addr, p + width)
        size = int.from_bytes(head[p:p + width], "little")
        blocks, out, seen = [(addr + p + width, size, False)], [], set()
        while blocks:
            start, length, is_cont = blocks.pop(0)
            if start in seen or len(seen) > MAX_BLOCKS:
                raise ValueError(f"object header at {addr}: continuation loop")
            seen.add(start)
            data = self._read(start, length)
            q, end = (4 if is_cont else 0), len(data) - (4 if is_cont else 0)
            while q + 4 <= end:
                mtype, msize, mflags = data[q], struct.unpack("<H", data[q + 1:q + 3])[0], data[q + 3]
                q += 4 + (2 if flags & 0x04 else 0)
                body = data[q:q + msize]
                q += msize
                conts = []
                out.extend(self._dispatch(mtype, body, conts))
                blocks.extend((a, n, True) for a, n in conts)
        return out

    @staticmethod
    def _dispatch(mtype, body, blocks):
        if mtype == 0x10 and len(body) >= 16:  # continuation
            blocks.append(struct.unpack("<QQ", body[:16]))
        elif mtype == 0x0C:  # attribute
            return [body]
        return []

    # -- global heap collections -----------------------------------------------------------
    def _collection(self, addr: int) -> dict:
        """index -> object size for the collection at ``addr``; libhdf5's walk, checked."""
        if addr in self._collections:
            return self._collections[addr]
        head = self._read(addr, 16)
        if head[:4] != b"GCOL" or head[4] != 1:
            raise ValueError(f"global heap at {addr}: bad signature or version")
        size = struct.unpack("<Q", head[8:16])[0]
        data = self._read(addr, size)
        objects, p = {}, 16
        while p < size:
            if p + 16 > size:
                break  # trailing bytes too small for an object header: free space
            index, _refs, _res, osize = struct.unpack("<HHIQ", data[p:p + 16])
            need = 16 + ((osize + 7) & ~7) if index else osize
            if need < 16 or p + need > size:
                raise ValueError(f"global heap at {addr}: object {index} at {p} has an "
                                 f"impossible size {osize}")
            if index:
                objects[index] = osize
            p += need
        self._collections[addr] = objects
        return objects


def _vlen_refs(body: bytes):
    """(heap address, object index, length) for each element of a vlen attribute message."""
    version = body[0] if body else 0
    if version not in (1, 2, 3):
        raise ValueError(f"attribute message version {version} is unknown")
    nsz, tsz, ssz = struct.unpack("<HHH", body[2:8])
    off = 8 + (1 if version == 3 else 0)
    pad = (lambda n: (n + 7) & ~7) if version == 1 else (lambda n: n)
    off += pad(nsz)
    dtype = body[off:off + tsz]
    off += pad(tsz)
    space = body[off:off + ssz]
    off += pad(ssz)
    if len(dtype) < 8 or dtype[0] & 0x0F != 9:  # not variable-length
        return []
    count = _space_count(space)
    data = body[off:]
    if count * 16 > len(data):
        raise ValueError(f"vlen attribute holds {len(data)} bytes for {count} elements")
    out = []
    for i in range(count):
        length, heap, index = struct.unpack("<IQI", data[16 * i:16 * i + 16])
        if length:
            out.append((heap, index, length))
    return out


def _space_count(space: bytes) -> int:
    if len(space) < 4:
        raise ValueError("attribute dataspace is truncated")
    version, rank = space[0], space[1]
    if version == 1:
        dims_at = 8
    elif version == 2:
        if space[3] == 2:  # null
            return 0
        dims_at = 4
    else:
        raise ValueError(f"dataspace version {version} is unknown")
    if len(space) < dims_at + 8 * rank:
        raise ValueError("attribute dataspace is truncated")
    count = 1
    for d in struct.unpack(f"<{rank}Q", space[dims_at:dims_at + 8 * rank]):
        count *= d
    return count
