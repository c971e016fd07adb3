"""Seekable file windows: a byte range of an open file seen as a file of its own.

h5py reads and writes Python file objects; these windows let it work directly on the
weights member inside a ``.keras`` zip, without extracting or copying it.
"""
from __future__ import annotations

import io


class Window(io.RawIOBase):
    """Read-only window on ``f`` from ``offset``; ``size`` bytes long, or to the end of
    ``f`` when ``size`` is None (a growing file)."""

    def __init__(self, f, offset, size=None):
        super().__init__()
        self._f, self._start, self._pos = f, offset, 0
        self.size = size

    def _end(self) -> int:
        if self.size is not None:
            return self.size
        self._f.seek(0, 2)
        return self._f.tell() - self._start

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
        n = max(0, min(len(buf), self._end() - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buf)[:n])
        self._pos += got
        return got

    def flush(self):
        if not self._f.closed and self._f.writable():
            self._f.flush()

    def close(self):  # the underlying file belongs to the caller
        super().close()


class WritableWindow(Window):
    """Read-write window that grows the underlying file (``size`` stays None)."""

    def writable(self):
        return True

    def write(self, data):
        self._f.seek(self._start + self._pos)
        n = self._f.write(data)
        self._pos += n
        return n

    def truncate(self, size=None):
        size = self._pos if size is None else size
        self._f.truncate(self._start + size)
        return size
