"""The file protocol (seek/tell/readinto/write) over positioned reads and writes.

h5py and zipfile take Python file objects; the journal's ``Overlay`` and the zip-member
windows in ``surgeon.formats.window`` are such objects, each defined by how it reads and
writes at an offset. ``PositionedFile`` keeps the position and turns the stream calls into
those positioned ones.
"""
from __future__ import annotations

import io


class PositionedFile(io.RawIOBase):
    """A seekable raw file; subclasses give ``_end()`` (the current size), ``_read_at(off,
    view)`` (fill the start of ``view``, return the count) and, when writable,
    ``writable()`` -> True and ``_write_at(off, view)`` (return the count written)."""

    _pos = 0

    def _end(self) -> int:
        raise NotImplementedError

    def _read_at(self, off, view) -> int:
        raise NotImplementedError

    def _write_at(self, off, view) -> int:
        raise io.UnsupportedOperation("write")

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=0):
        base = {0: 0, 1: self._pos}.get(whence)
        if base is None:
            base = self._end()
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf):
        got = self._read_at(self._pos, memoryview(buf).cast("B"))
        self._pos += got
        return got

    def write(self, data):
        n = self._write_at(self._pos, memoryview(data).cast("B"))
        self._pos += n
        return n
