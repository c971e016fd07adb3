"""In-place writers (``apply``/``transplant --in-place``): edit a ``.keras``, a
``.weights.h5`` or a legacy ``.h5`` where it lies, writing only the bytes that change.

The file is opened through a ``surgeon.core.journal.Overlay``: h5py opens it (or, for a
``.keras``, the stored weights member inside it) read-write, and every byte h5py writes
-- the edited tensors, the surgery log dataset and whatever HDF5 metadata that changes --
stays in memory until ``finalize``, which commits the changes through the rollback
journal beside the file (crash-safe: see ``surgeon.core.journal``). For a ``.keras`` the
weights member's CRC-32 is recomputed from the changed bytes only (``keras_patch``'s CRC
algebra) and written into its local header; everything after the weights member (the
surgery log member and the central directory) is rewritten, a few kB.

Only edits that keep every tensor's shape and dtype go in place (``check_in_place`` and
the writer itself refuse the rest, before the file is touched).
"""
from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import h5py

from surgeon.core import journal
from surgeon.core.errors import SurgeonError, WriteError
from .keras_patch import _PatchBase, _multmodp, _x2nmodp, crc32_combine, crc32_zeros
from .keras_zip import WEIGHTS, _data_offset
from .window import Window

FORMATS = ("keras", "keras-weights-h5", "legacy-h5")


class InPlaceRefused(SurgeonError):
    """The edit cannot be made in place (said why; nothing was touched)."""


def refuse(path, why, hint="write a new file with -o OUT instead of --in-place"):
    raise InPlaceRefused(f"{path}: cannot edit in place: {why}; {hint}")


def check_format(reader):
    """Refuse formats and layouts that cannot be edited in place."""
    path = getattr(reader, "zip_path", reader.path)
    if reader.format not in FORMATS:
        refuse(path, f"{reader.format} files are not supported (only .keras, .weights.h5 and legacy .h5)")
    if reader.format == "keras-weights-h5" and len(getattr(reader, "_files", [])) != 1:
        refuse(path, "sharded weights are not supported")
    if reader.format == "keras":
        w = next((i for i in reader.members if i.filename == WEIGHTS), None)
        if w is None or w.compress_type != zipfile.ZIP_STORED:
            refuse(path, f"its {WEIGHTS} member is compressed")
        if w.flag_bits & 0x08:
            refuse(path, f"its {WEIGHTS} member uses a data descriptor")


class _MemberWindow(Window):
    """Read-write window onto the weights member inside the overlay; may grow (the bytes
    after it are rewritten anyway), never shrink."""

    def writable(self):
        return True

    def _write_at(self, off, view):
        self._f.pwrite(self._start + off, view)
        self.size = max(self.size, off + len(view))
        return len(view)

    def truncate(self, size=None):
        size = self._pos if size is None else size
        if size < self.size:
            raise OSError("the HDF5 library shrank the weights member; cannot edit in place")
        self.size = size
        return size


class InPlaceH5Writer(_PatchBase):
    """Edit a single-file ``.weights.h5`` or legacy ``.h5`` in place."""

    def __init__(self, reader):
        self.reader, self.target = reader, Path(reader.path)
        self._ov = journal.Overlay(self.target)
        try:
            self._h5 = h5py.File(self._ov, "r+")
        except BaseException:
            self._ov.close()
            raise
        self.bytes_written = 0

    def finalize(self):
        try:
            self._h5.close()
            self.bytes_written = journal.commit(self._ov)
        except OSError as exc:
            self.abort()
            raise WriteError(f"cannot edit {self.target} in place: {exc.strerror or exc}") from None
        self._ov.close()
        return self.target

    def abort(self):
        for closer in (getattr(self, "_h5", None), self._ov):
            try:
                closer.close()
            except Exception:
                pass


class InPlaceZipWriter(InPlaceH5Writer):
    """Edit a ``.keras`` in place: the weights member through h5py, then its CRC, the
    members after it and the central directory."""

    def __init__(self, reader):
        self.reader, self.target = reader, Path(reader.zip_path)
        self._replace = {}
        self.bytes_written = 0
        self._ov = journal.Overlay(self.target)
        try:
            self._w = next(i for i in reader.members if i.filename == WEIGHTS)
            self._data = _data_offset(self.target, self._w)
            self._member = _MemberWindow(self._ov, self._data, self._w.file_size)
            self._h5 = h5py.File(self._member, "r+")
        except BaseException:
            self._ov.close()
            raise

    def set_member(self, member, data: bytes):
        self._replace[member] = data

    def finalize(self):
        try:
            self._h5.close()
            crc = self._member_crc()
            self._patch_local_header(crc)
            self._write_tail(crc)
            self.bytes_written = journal.commit(self._ov)
        except (OSError, ValueError, zipfile.BadZipFile, struct.error) as exc:
            self.abort()
            raise WriteError(f"cannot edit {self.target} in place: {exc}") from None
        self._ov.close()
        return self.target

    def _member_crc(self) -> int:
        """The weights member's new CRC-32 from its old one and the changed bytes only."""
        old, size, start = self._w.file_size, self._member.size, self._data
        crc = self._w.CRC
        if size > old:  # the old bytes followed by zeros, then the growth as a change
            crc = crc32_combine(crc, crc32_zeros(size - old), size - old)
        spans, _ = self._ov.changes(start, start + old)
        pieces = [(a - start, o, n) for a, o, n in spans if start <= a < start + old]
        if size > old:
            pieces.append((old, bytes(size - old), self._ov.pread(start + old, size - old)))
        for pos, o, n in pieces:
            k = min(len(n), old - pos) if pos < old else len(n)
            o = o[:k].ljust(k, b"\0")
            # the CRC's linear part of (old XOR new) = that of old XOR that of new, so the
            # two are hashed as they are (no XORed copy); then shifted past the bytes after
            linear = zlib.crc32(o, 0xFFFFFFFF) ^ zlib.crc32(memoryview(n)[:k], 0xFFFFFFFF)
            after = size - pos - k
            crc ^= _multmodp(_x2nmodp(after, 3), linear) if after else linear
        return crc

    def _patch_local_header(self, crc):
        w, size, ov = self._w, self._member.size, self._ov
        head = ov.pread(w.header_offset, 30)
        n, extra_len = struct.unpack("<HH", head[26:30])
        ov.pwrite(w.header_offset + 14, struct.pack("<L", crc))
        if size == w.file_size:
            return
        if struct.unpack("<LL", head[18:26]) == (0xFFFFFFFF, 0xFFFFFFFF):
            extra = ov.pread(w.header_offset + 30 + n, extra_len)
            i = 0
            while i + 4 <= len(extra):
                hid, ln = struct.unpack("<HH", extra[i:i + 4])
                if hid == 1:
                    ov.pwrite(w.header_offset + 30 + n + i + 4, struct.pack("<QQ", size, size))
                    return
                i += 4 + ln
            raise ValueError("zip64 local header without its size field")
        if size >= 0xFFFFFFFF:
            raise ValueError("weights grew past 4 GB in a non-zip64 member")
        ov.pwrite(w.header_offset + 18, struct.pack("<LL", size, size))

    def _write_tail(self, crc):
        """Cut the file after the weights member; append the members that were after it
        (and the replaced ones), then the central directory."""
        import copy
        ov, w = self._ov, self._w
        end = self._data + self._member.size
        infos = [copy.copy(i) for i in self.reader.members]
        before = [i for i in infos if i.header_offset <= w.header_offset and i.filename not in self._replace]
        after = [i for i in infos if i.header_offset > w.header_offset and i.filename not in self._replace]
        old_data = {}
        if after:
            with zipfile.ZipFile(self.target) as zf:  # the file itself is unchanged until commit
                old_data = {i.filename: zf.read(i.filename) for i in after}
        for i in before:
            if i.filename == WEIGHTS:
                i.CRC, i.compress_size, i.file_size = crc, self._member.size, self._member.size
        ov.truncate(end)
        ov.seek(0)
        zf = zipfile.ZipFile(ov, "w")
        zf.filelist = list(before)
        zf.NameToInfo = {i.filename: i for i in before}
        zf.start_dir = end
        order = {i.filename: k for k, i in enumerate(infos)}
        for i in after:
            zf.writestr(_fresh(i, i), old_data[i.filename])
        for member, data in self._replace.items():
            old = next((i for i in infos if i.filename == member), None)
            zf.writestr(_fresh(zipfile.ZipInfo(member, old.date_time if old else (1980, 1, 1, 0, 0, 0)), old), data)
        zf.filelist.sort(key=lambda i: order.get(i.filename, len(order)))
        zf.close()


def _fresh(zinfo, like):
    """A new ``ZipInfo`` named like ``zinfo`` with ``like``'s compression and attributes."""
    out = zipfile.ZipInfo(zinfo.filename, zinfo.date_time)
    if like is not None:
        out.compress_type, out.external_attr = like.compress_type, like.external_attr
    return out


def open_in_place(reader):
    """The in-place writer for ``reader``'s file (refused when it cannot be edited in place)."""
    check_format(reader)
    return InPlaceZipWriter(reader) if reader.format == "keras" else InPlaceH5Writer(reader)
