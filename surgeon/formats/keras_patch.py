"""Clone-and-patch writers: copy the file, then overwrite edited tensors in place.

When every edited tensor keeps its shape and dtype (the usual surgery), the fastest
lossless output is the input itself, cloned (a reflink where the filesystem can, else a
copy from an mmap with writeback started as it goes: ``surgeon.core.fastio``), with
those datasets overwritten in place through h5py. Every other
byte is the input's. For a ``.keras`` the inner H5 is patched inside the cloned zip (it
must be the last, stored member); the member's CRC is updated from the bytes that
changed only (CRC-32 is affine, so ``crc(new) = crc(old) ^ crc(diff) ^ crc(zeros)``),
and the central directory is rewritten. Same protocol as the other writers.
"""
from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np

from surgeon.core import atomic, fastio
from surgeon.core.errors import WriteError
from .window import Window
from .keras_zip import WEIGHTS, _data_offset
from .clone import BackgroundClone  # noqa: F401  (re-exported: the writers adopt one)

# -- CRC-32 algebra (zlib's crc32_combine, which Python's zlib does not expose) ----------
_POLY = 0xEDB88320


def _multmodp(a, b):
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


_X2N = [1 << 30]
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def _x2nmodp(n, k):
    p = 1 << 31
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def _py_combine(crc1, crc2, len2):
    return _multmodp(_x2nmodp(len2, 3), crc1) ^ (crc2 & 0xFFFFFFFF)


_COMBINE = []  # zlib's own crc32_combine64 through ctypes (~100x faster), checked once


def _combiner():
    if not _COMBINE:
        fn = _py_combine
        try:
            import ctypes
            c = ctypes.CDLL("libz.so.1").crc32_combine64
            c.restype, c.argtypes = ctypes.c_ulong, [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int64]
            if all(c(a, b, n) == _py_combine(a, b, n) for a, b, n in
                   ((0x12345678, 0x9ABCDEF0, 1), (0xDEADBEEF, 7, 300_000_017), (1, 0, 1 << 40))):
                fn = c
        except (OSError, AttributeError, TypeError):
            pass
        _COMBINE.append(fn)
    return _COMBINE[0]


def crc32_combine(crc1, crc2, len2):
    """CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)``."""
    return _combiner()(crc1, crc2 & 0xFFFFFFFF, len2) if len2 else crc1 ^ (crc2 & 0xFFFFFFFF)


def crc_shift(linear, after):
    """The CRC's linear part ``linear`` moved ``after`` zero bytes on (x^(8 after) mod P):
    a few microseconds through zlib (every raw write of a ``.keras`` member pays one)."""
    return _combiner()(linear, 0, after) if after else linear


def crc32_zeros(n):
    """CRC-32 of ``n`` zero bytes, in O(log n)."""
    crc, block, size = 0, zlib.crc32(b"\0"), 1
    while n:
        if n & 1:
            crc = crc32_combine(crc, block, size)
        block = crc32_combine(block, block, size)
        size *= 2
        n >>= 1
    return crc


def crc32_delta(diff, after):
    """How the CRC-32 of a message changes when ``diff`` is XORed into it ``after`` bytes
    before its end: the CRC's linear part of ``diff`` shifted by ``after`` zero bytes
    (independent of the position from the start and of the length: ~30 polynomial steps
    per write instead of three zero-run CRCs)."""
    linear = fastio.crc32(diff, 0xFFFFFFFF) ^ 0xFFFFFFFF  # register starts and ends unxored
    return crc_shift(linear, after)


class CrcTrackingFile(Window):
    """A growable read-write window onto a zip member that keeps the member's CRC-32
    current by looking only at the bytes each write changes."""

    def __init__(self, f, offset, size, crc):
        super().__init__(f, offset, size)
        self.crc = crc

    def writable(self):
        return True

    def _extend(self, new_size):
        if new_size > self.size:
            self.crc = crc32_combine(self.crc, crc32_zeros(new_size - self.size), new_size - self.size)
            self.size = new_size

    def write(self, data):
        data = memoryview(data).cast("B")
        k, p = len(data), self._pos
        old_size = self.size
        self._extend(p + k)
        old = bytearray(k)
        inside = max(0, min(k, old_size - p))
        if inside:
            self._f.seek(self._start + p)
            self._f.readinto(memoryview(old)[:inside])
        diff = np.bitwise_xor(np.frombuffer(old, np.uint8), np.frombuffer(data, np.uint8))
        if diff.any():
            self.crc ^= crc32_delta(diff, self.size - p - k)
        self._f.seek(self._start + p)
        self._f.write(data)
        self._pos += k
        return k

    def truncate(self, size=None):
        size = self._pos if size is None else size
        if size < self.size:
            raise OSError("the HDF5 library shrank the weights member; cannot patch in place")
        self._extend(size)
        return size


def clone_file(src, dst, length=None):
    """Copy ``src`` (its first ``length`` bytes) to ``dst``: a reflink where the filesystem
    can, else a copy in the kernel with writeback started as it goes
    (``surgeon.core.fastio.copy_file``); the mode bits follow."""
    fastio.copy_file(src, dst, length=length)


class _PatchBase:
    """Shared write/add_extra over an h5py file opened r+ on the clone."""

    def _open(self, source, base=0, crc=False):
        from .rawpatch import RawSink
        self._h5 = h5py.File(source, "r+")
        self._raw_base = base
        self.sink = RawSink(self._tmp, crc=crc).background()

    def raw_regions(self, names) -> dict:
        """``{name: regions}`` for the pool's workers (``rawpatch.RawSink``); names whose
        datasets cannot be written raw are left out."""
        from .rawpatch import regions_of
        out = {}
        if getattr(self, "sink", None) is None:  # in-place writers: every byte via the journal
            return out
        for n in names:
            if n not in self.sink.regions:
                self.sink.regions[n] = regions_of(self._h5, self.reader, n, self._raw_base)
            if self.sink.regions[n]:
                out[n] = self.sink.regions[n]
        return out

    def absorb(self, done):
        """Take in the CRC changes of raw writes (only a ``.keras`` member tracks one)."""

    def _begin(self, setup):
        """Run ``setup`` (clone the input, open the clone); on failure remove the temp file
        and, for environment errors (disk full, read-only), raise a one-line WriteError."""
        try:
            setup()
        except OSError as exc:
            atomic.discard(self._tmp)
            raise WriteError(f"cannot write {self.target}: {exc.strerror or exc}") from None
        except BaseException:
            atomic.discard(self._tmp)
            raise

    def write(self, name, array):
        if self.raw_regions([name]):
            done = self.sink.put(name, array)
            if done is not None:
                self.absorb(done)
                return
        e = self.reader.entry(name)
        for key in (e.key, *getattr(self.reader, "mirrors", {}).get(e.key, ())):
            self._write_key(name, key, array)

    def _write_key(self, name, key, array):
        path = self.reader._root[key].path
        ds = self._h5[path]
        arr = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if tuple(ds.shape) != arr.shape or ds.dtype.itemsize != arr.dtype.itemsize:
            raise WriteError(f"{self.target}: {name} changes shape or dtype; "
                             "the in-place writer cannot store it")
        if arr.dtype != ds.dtype:
            arr = arr.view(ds.dtype)
        ds.write_direct(arr) if arr.ndim else ds.__setitem__((), arr)

    def copy_from(self, reader, name):
        self.write(name, reader.read(name))

    def add_extra(self, path, array):
        if path in self._h5:
            del self._h5[path]
        self._h5.create_dataset(path, data=array)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.abort()


class PatchH5Writer(_PatchBase):
    """Clone a single-file ``.weights.h5`` and patch the edited datasets in place."""

    def __init__(self, reader, target, clone=None):
        self.reader, self.target = reader, Path(target)
        self._tmp = clone.tmp if clone else atomic.temp_path(self.target)
        copy = clone.take if clone else (lambda: clone_file(reader.path, self._tmp))
        self._begin(lambda: (copy(), self._open(self._tmp)))

    def finalize(self):
        try:
            self.sink.finish()
            self.sink.close()
            self._h5.close()
            atomic.commit(self._tmp, self.target)
        except OSError as exc:
            self.abort()
            raise WriteError(f"cannot write {self.target}: {exc}") from None
        return self.target

    def abort(self):
        for closer in (getattr(self, "sink", None), getattr(self, "_h5", None)):
            try:
                closer.close()
            except Exception:
                pass
        atomic.discard(self._tmp)


def zip_patchable(reader) -> bool:
    """True when the ``.keras`` weights member is stored and is the last member's data."""
    members = reader.members
    w = next((i for i in members if i.filename == WEIGHTS), None)
    if w is None or w.compress_type != zipfile.ZIP_STORED:
        return False
    return all(i.header_offset < w.header_offset for i in members if i is not w)


class PatchZipWriter(_PatchBase):
    """Clone a ``.keras`` and patch its inner H5 in place (see the module docstring)."""

    def __init__(self, reader, target, clone=None):
        self.reader, self.target = reader, Path(target)
        self._replace = {}
        self._tmp = clone.tmp if clone else atomic.temp_path(self.target)
        self._clone = clone
        self._begin(self._setup)

    def _setup(self):
        self._winfo = next(i for i in self.reader.members if i.filename == WEIGHTS)
        self._data = _data_offset(self.reader.zip_path, self._winfo)
        end = self._data + self._winfo.file_size  # the copy needs no byte past the member
        if self._clone:
            self._clone.take()
        if not self._clone or os.path.getsize(self._tmp) < end:  # (a short clone is redone)
            clone_file(self.reader.zip_path, self._tmp, end)
        self._file = open(self._tmp, "r+b")
        # drop whatever follows the member (the old central directory of a whole-file
        # clone): bytes past the member must read as zeros. A clone of exactly the
        # member's end is not truncated (a no-op that waits for the copy's writeback).
        if os.fstat(self._file.fileno()).st_size != end:
            self._file.truncate(end)
        self._member = CrcTrackingFile(self._file, self._data, self._winfo.file_size, self._winfo.CRC)
        self._file.flush()
        self._open(self._member, self._data, crc=True)

    def absorb(self, done):
        for linear, end in done:
            after = self._member.size - (end - self._data)
            self._member.crc ^= crc_shift(linear, after)

    def set_member(self, member, data: bytes):
        self._replace[member] = data

    def finalize(self):
        try:
            self.absorb(self.sink.finish())
            self.sink.close()
            self._h5.close()
            self._file.flush()
            self._patch_local_header()
            self._write_directory()
            self._file.close()
            atomic.commit(self._tmp, self.target)
        except (OSError, ValueError, zipfile.BadZipFile, struct.error) as exc:
            self.abort()
            raise WriteError(f"cannot write {self.target}: {exc}") from None
        return self.target

    def _patch_local_header(self):
        w, m = self._winfo, self._member
        f = self._file
        f.seek(w.header_offset)
        head = f.read(30)
        n, extra_len = struct.unpack("<HH", head[26:30])
        f.seek(w.header_offset + 30 + n)
        extra = f.read(extra_len)
        f.seek(w.header_offset + 14)
        f.write(struct.pack("<L", m.crc))
        sizes32 = struct.unpack("<LL", head[18:26])
        if sizes32 == (0xFFFFFFFF, 0xFFFFFFFF):  # zip64: sizes live in the extra field
            i = 0
            while i + 4 <= len(extra):
                hid, ln = struct.unpack("<HH", extra[i:i + 4])
                if hid == 1:
                    f.seek(w.header_offset + 30 + n + i + 4)
                    f.write(struct.pack("<QQ", m.size, m.size))
                    return
                i += 4 + ln
            raise ValueError("zip64 local header without its size field")
        if m.size >= 0xFFFFFFFF:
            raise ValueError("weights grew past 4 GB in a non-zip64 member")
        f.write(struct.pack("<LL", m.size, m.size))

    def _write_directory(self):
        """Append replaced/new members after the weights and rewrite the central directory."""
        import copy
        f = self._file
        end = self._data + self._member.size
        f.flush()
        if os.fstat(f.fileno()).st_size != end:  # (even to the same size, an ftruncate
            f.truncate(end)                       # waits for the writeback of the last page)
        f.seek(0)
        zf = zipfile.ZipFile(f, "w")
        infos = [copy.copy(i) for i in self.reader.members]
        for i in infos:
            if i.filename == WEIGHTS:
                i.CRC, i.compress_size, i.file_size = self._member.crc, self._member.size, self._member.size
        zf.filelist = [i for i in infos if i.filename not in self._replace]
        zf.NameToInfo = {i.filename: i for i in zf.filelist}
        zf.start_dir = end
        order = {i.filename: k for k, i in enumerate(infos)}
        for member, data in self._replace.items():
            old = next((i for i in infos if i.filename == member), None)
            zinfo = zipfile.ZipInfo(member, old.date_time if old else (1980, 1, 1, 0, 0, 0))
            if old is not None:
                zinfo.compress_type, zinfo.external_attr = old.compress_type, old.external_attr
            zf.writestr(zinfo, data)
        zf.filelist.sort(key=lambda i: order.get(i.filename, len(order)))
        zf.close()

    def abort(self):
        for closer in (getattr(self, "sink", None), getattr(self, "_h5", None), getattr(self, "_file", None)):
            try:
                closer.close()
            except Exception:
                pass
        atomic.discard(self._tmp)


def open_patch_writer(target, like, clone=None):
    """A clone-and-patch writer for ``like`` when its format allows it, else None.
    ``clone``: a ``BackgroundClone`` already copying the input to ``target``'s temp file,
    adopted when it copies this input for this target."""
    if like.format == "keras-weights-h5" and len(getattr(like, "_files", [])) == 1 \
            and Path(target).resolve() != Path(like.path).resolve():
        ok = clone is not None and clone.matches(like.path, target)
        return PatchH5Writer(like, target, clone if ok else None)
    if like.format == "keras" and zip_patchable(like) \
            and Path(target).resolve() != Path(like.zip_path).resolve():
        ok = clone is not None and clone.matches(like.zip_path, target)
        return PatchZipWriter(like, target, clone if ok else None)
    return None

