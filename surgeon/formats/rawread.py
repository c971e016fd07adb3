"""Raw reads of plain HDF5 datasets: a contiguous, unfiltered numeric dataset's value is
exactly its stored bytes (``h5tree.raw_extent``), so the readers fetch it with one
``preadv`` at its offset instead of going through HDF5 (and, for a ``.keras``, through the
Python file object h5py reads the zip member with: thousands of small reads per model).
The bytes, dtype and shape are what h5py returns (tests/test_executors.py checks it).
"""
from __future__ import annotations

import os

import numpy as np

from .window import Window


def open_source(f):
    """``(fd, base, size)`` for raw reads of the H5 behind the h5py file ``f``: its path, or
    the zip member window it was opened on (``keras_h5.open_h5`` records the source as
    ``f.surgeon_source``); None for anything else (then h5py reads)."""
    src = getattr(f, "surgeon_source", None)
    if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__"):
        fd = os.open(src, os.O_RDONLY)
        return fd, 0, os.fstat(fd).st_size
    name = getattr(getattr(src, "_f", None), "name", None)
    if isinstance(src, Window) and isinstance(name, str) and src.size is not None:
        fd = os.open(name, os.O_RDONLY)
        return fd, src._start, min(src.size, os.fstat(fd).st_size - src._start)
    return None


def read_extent(src, ds) -> np.ndarray:
    """The value of ``ds`` (an ``h5tree.DS`` with ``raw``) from ``src`` (``open_source``).
    Refuses (ValueError) bytes past the end of the file or member before allocating."""
    fd, base, size = src
    off, n = ds.raw
    if off + n > size:
        raise ValueError(f"{ds.path}: its {n} bytes at offset {off} lie past the end of the file ({size})")
    arr = np.empty(ds.shape, ds.dtype)
    buf = arr.reshape(-1).view(np.uint8)
    got = 0
    while got < n:
        k = os.preadv(fd, [buf[got:]], base + off + got)
        if k <= 0:
            raise ValueError(f"{ds.path}: truncated ({got} of {n} bytes)")
        got += k
    return arr


def same_source(f):
    """What to open a new h5py file on, for the same bytes as ``f`` (in a forked worker:
    its path, or a new window on its zip member, never the parent's file object)."""
    src = getattr(f, "surgeon_source", None)
    if isinstance(src, Window):
        from .keras_zip import MemberFile
        return MemberFile(src._f.name, src._start, src.size)
    return f.filename if src is None else src
