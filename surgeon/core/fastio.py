"""Fast whole-file I/O for the clone-and-patch writers and the input content hashes.

Measured on the 2-core ext4 VM (1.15 GB ``.keras``, page cache warm; benchmarks/RESULTS.md):

- ``copy_file``: ``copy_file_range`` (in the kernel; a reflink on XFS/btrfs) 64 MB at a
  time, 0.5 s of CPU per 1.15 GB on ext4 (a copy from an mmap took 0.75 s, ``cp`` 0.7 s).
  Writeback of each copied piece is started at once (``sync_file_range``, asynchronous),
  so the disk writes while the copy goes on and while the caller edits the copy; the
  final ``fsync`` before the atomic rename (``atomic.commit``) finds little left to
  write. ``cp`` + ``sync`` does the two one after the other.
- ``sha256_file``: sha256 (SHA-NI where the CPU has it, through OpenSSL) over an ``mmap``
  of the file: no copy into Python buffers, 0.85 s of CPU per 1.15 GB against 1.1 s with
  ``read()`` and 1.5 s with ``hashlib.file_digest``. BLAKE2b is slower here (0.6 GB/s).
  Hashing releases the GIL, so it runs on another core beside the copy.
- ``crc32``: zlib's CRC-32 (the zip members' checksum) through ISA-L (the optional ``isal``
  package, PCLMULQDQ) where installed: 8.5 GB/s against zlib's 2 GB/s on the EPYC VM, the
  same values; it releases the GIL like zlib's.
- ``hash_file(path, "blake3")``: BLAKE3 (the optional ``blake3`` package, AVX2/AVX-512),
  one thread, over the same mmap: ~1.6-2x less CPU than sha256 with SHA-NI on the 2-core
  EPYC VM (0.19 against 0.37 CPU-s per 554 MB), more on CPUs without SHA-NI.
- Tried and dropped (issue 14, 7 paired runs on 1.15 GB): one pass that hashes each 1 MB
  block of an mmap and writes it (the file read once instead of twice) took as much CPU
  as the copy and the hash in two threads and more wall time (one core instead of two);
  ``MAP_POPULATE`` or ``readinto`` instead of the plain mmap saved no hashing CPU.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import shutil

CHUNK = 1 << 23  # 8 MB per hash update
FLUSH_EVERY = 1 << 26  # start writeback every 64 MB
WINDOW = 1 << 26  # map 64 MB at a time
_SYNC_FILE_RANGE_WRITE = 2

try:  # the fastcrc extra
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - without the extra
    from zlib import crc32 as _crc32


def crc32(data, value: int = 0) -> int:
    """``zlib.crc32(data, value)``, through ISA-L when the ``isal`` package is installed."""
    return _crc32(data, value)


class Cancelled(Exception):
    """``sha256_file`` stopped because its ``cancel`` event was set."""


def sha256_file(path, cancel=None) -> str:
    """sha256 hex digest of the file at ``path``; raises ``Cancelled`` as soon as the
    ``cancel`` event (a ``threading.Event``) is set (a run failing early stops hashing)."""
    return hash_file(path, "sha256", cancel)


def new_hash(algorithm: str):
    """A fresh hash object: ``sha256`` (hashlib) or ``blake3`` (the ``blake3`` package,
    single-threaded: the other core copies the file meanwhile)."""
    if algorithm == "blake3":
        import blake3
        return blake3.blake3(max_threads=1)
    return hashlib.new(algorithm)


def hash_file(path, algorithm="sha256", cancel=None) -> str:
    """Hex digest of the file at ``path`` with ``algorithm`` (see ``new_hash``); raises
    ``Cancelled`` as soon as the ``cancel`` event is set."""
    h = new_hash(algorithm)
    with open(path, "rb") as f:
        for view in mapped(f):
            if cancel is not None and cancel.is_set():
                raise Cancelled(path)
            h.update(view)
    return h.hexdigest()


def mapped(f, window=WINDOW):
    """The bytes of the open file ``f`` as successive read-only memoryviews of at most
    ``CHUNK`` bytes, mapped ``window`` bytes at a time (so the mapped pages counted in the
    process RSS stay bounded); plain reads where the file cannot be mapped."""
    size = os.fstat(f.fileno()).st_size
    for start in range(0, size, window):
        length = min(window, size - start)
        try:
            m = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=start)
        except (OSError, ValueError):  # not mappable (an odd filesystem): read instead
            f.seek(start)
            for i in range(0, length, CHUNK):
                yield memoryview(f.read(min(CHUNK, length - i)))
            continue
        with m:
            _advise(m)
            view = memoryview(m)
            try:
                for i in range(0, length, CHUNK):
                    part = view[i:i + CHUNK]
                    try:
                        yield part
                    finally:
                        part.release()
            finally:
                view.release()


def _advise(m):
    try:
        m.madvise(mmap.MADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass


_sync_file_range = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` of ``fd`` to disk now,
    without waiting for it (``sync_file_range(SYNC_FILE_RANGE_WRITE)``); a no-op where the
    call does not exist. Durability still comes from the ``fsync`` before the rename."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _sync_file_range = fn
        except (OSError, AttributeError, ImportError):
            pass
    if _sync_file_range:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


FICLONE = 0x40049409  # ioctl: share every extent of a file (XFS, btrfs, bcachefs)


def reflink(fi, fo) -> bool:
    """Make ``fo`` a copy-on-write clone of ``fi`` (open files) in O(1): no data is read
    or written, the clone shares ``fi``'s extents until either is written. False where
    the filesystem cannot (ext4, tmpfs, across filesystems)."""
    try:
        import fcntl
        fcntl.ioctl(fo.fileno(), FICLONE, fi.fileno())
        return True
    except (OSError, ImportError, AttributeError):
        return False


def copy_file(src, dst, cancel=None, length=None) -> None:
    """Copy ``src`` onto ``dst`` (created or truncated): a reflink clone (``FICLONE``)
    where the filesystem can, else in the kernel 64 MB at a time (``copy_file_range``;
    server-side on NFS), starting the writeback of each piece as it goes;
    ``shutil.copyfile`` where the call is missing or refused. The mode bits follow.
    ``length``: copy only the first ``length`` bytes (a ``.keras`` clone stops at the end
    of its weights member: the members after it are rewritten anyway, and cutting them
    off the copy afterwards (``ftruncate``) waits for the writeback of the last pages,
    0.07-0.4 s measured on ext4; a reflink clones it all). Raises ``Cancelled`` when the ``cancel`` event is set."""
    with open(src, "rb") as fi, open(dst, "wb", buffering=0) as fo:
        size, done = os.fstat(fi.fileno()).st_size, 0
        if size and reflink(fi, fo):  # all of it, in O(1): cutting the tail off is cheap
            done = size
        elif length is not None and length < size:
            size = length
        try:
            while done < size:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(src)
                n = os.copy_file_range(fi.fileno(), fo.fileno(), min(size - done, FLUSH_EVERY))
                if n == 0:
                    raise OSError("copy_file_range made no progress")
                start_writeback(fo.fileno(), done, n)
                done += n
        except (AttributeError, OSError):
            if done:  # start over (a partly written copy is never kept)
                fo.seek(0)
                fo.truncate()
            fi.seek(0)
            _copy_prefix(fi, fo, size)
    shutil.copymode(src, dst)


def _copy_prefix(fi, fo, size):
    """Plain reads and writes of the first ``size`` bytes of ``fi`` (the fallback)."""
    while size > 0:
        block = fi.read(min(CHUNK, size))
        if not block:
            break
        fo.write(block)
        size -= len(block)
