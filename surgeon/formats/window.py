"""Seekable file windows: a byte range of an open file seen as a file of its own.

h5py reads and writes Python file objects; these windows let it work directly on the
weights member inside a ``.keras`` zip, without extracting or copying it.
"""
from __future__ import annotations

from surgeon.core.rawfile import PositionedFile


class Window(PositionedFile):
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

    def _read_at(self, off, view):
        n = max(0, min(len(view), self._end() - off))
        self._f.seek(self._start + off)
        return self._f.readinto(view[:n])

    def flush(self):
        if not self._f.closed and self._f.writable():
            self._f.flush()

    def close(self):  # the underlying file belongs to the caller
        super().close()


class WritableWindow(Window):
    """Read-write window that grows the underlying file (``size`` stays None)."""

    def writable(self):
        return True

    def _write_at(self, off, view):
        self._f.seek(self._start + off)
        return self._f.write(view)

    def truncate(self, size=None):
        size = self._pos if size is None else size
        self._f.truncate(self._start + size)
        return size
