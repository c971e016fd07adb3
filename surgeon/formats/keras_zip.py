"""Keras 3 ``.keras`` archives: reader and lossless writer.

The archive holds ``metadata.json``, ``config.json`` and ``model.weights.h5`` (plus
optional ``assets/``). Keras stores members uncompressed, so the inner H5 is read in
place through a window onto the zip file -- nothing is extracted.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

from surgeon.core.errors import FormatError, SurgeonError, WriteError
from surgeon.core import atomic, fastio
from .clone import member_data_offset
from .window import Window, WritableWindow
from .keras_h5 import KerasH5Reader, KerasH5Writer, open_h5

WEIGHTS = "model.weights.h5"
MAX_RATIO = 200  # reject members that expand more than this (zip bombs)


class MemberFile(Window):
    """Read-only, seekable window onto an uncompressed zip member (owns its file handle)."""

    def __init__(self, path, offset, size):
        super().__init__(open(path, "rb"), offset, size)

    def close(self):
        self._f.close()
        super().close()


def _data_offset(path, info: zipfile.ZipInfo) -> int:
    try:
        return member_data_offset(path, info)
    except ValueError as exc:
        raise FormatError(f"{path}: corrupt .keras archive ({exc})") from None


def _open_zip(path) -> zipfile.ZipFile:
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise FormatError(f"{path}: not a valid .keras archive (truncated or corrupt zip): {exc}") from None
    for info in zf.infolist():
        problem = _unsafe_member(info)
        if problem:
            zf.close()
            raise FormatError(f"{path}: {problem} in .keras archive")
    return zf


def _unsafe_member(info: zipfile.ZipInfo):
    """Why a member must not be trusted (path traversal, symlink, zip bomb), or None."""
    name = info.filename
    if (name.startswith("/") or ".." in Path(name).parts or "\\" in name or "\0" in name
            or (len(name) > 1 and name[1] == ":")):
        return f"unsafe member name {name!r}"
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"member {name!r} is a symbolic link"
    if (info.compress_type != zipfile.ZIP_STORED
            and info.file_size > MAX_RATIO * max(info.compress_size, 1) + 1_000_000):
        return (f"member {name!r} has an absurd compression ratio "
                f"({info.file_size} bytes from {info.compress_size})")
    return None


def read_zip_json(path, member) -> dict:
    with _open_zip(path) as zf:
        try:
            return json.loads(zf.read(member))
        except KeyError:
            raise FormatError(f"{path}: .keras archive has no {member}") from None
        except (ValueError, zipfile.BadZipFile, OSError) as exc:
            raise FormatError(f"{path}: {member} is damaged: {exc}") from None


class KerasZipReader(KerasH5Reader):
    """Canonical view of a ``.keras`` file."""

    format = "keras"

    def __init__(self, path):
        path = Path(path)
        self.zip_path = path
        self._tmpdir = None
        zf = _open_zip(path)
        try:
            self.members = zf.infolist()
            names = [i.filename for i in self.members]
            for need in ("config.json", WEIGHTS):
                if need not in names:
                    raise FormatError(f"{path}: .keras archive has no {need}")
            self.raw = {i.filename: zf.read(i) for i in self.members if i.filename != WEIGHTS
                        and not i.is_dir() and i.file_size < 64 * 2**20}
            info = zf.getinfo(WEIGHTS)
            h5src = self._weights_source(path, zf, info)
        except (zipfile.BadZipFile, OSError) as exc:
            raise FormatError(f"{path}: corrupt .keras archive: {exc}") from None
        finally:
            zf.close()
        try:
            self.config = json.loads(self.raw["config.json"])
            self.keras_metadata = json.loads(self.raw.get("metadata.json", b"{}"))
        except ValueError as exc:
            raise FormatError(f"{path}: config.json/metadata.json is not valid JSON: {exc}") from None
        super().__init__(path, [open_h5(h5src, f"{path}!{WEIGHTS}")], self.config)

    def _weights_source(self, path, zf, info):
        if info.compress_type == zipfile.ZIP_STORED:
            return MemberFile(path, _data_offset(path, info), info.file_size)
        self._tmpdir = tempfile.mkdtemp(prefix="surgeon-")
        out = Path(self._tmpdir) / WEIGHTS
        with zf.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return str(out)

    def metadata(self):
        md = super().metadata()
        md["keras_version"] = self.keras_metadata.get("keras_version")
        return md

    def close(self):
        super().close()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


OffsetFile = WritableWindow  # the inner H5 written straight into the zip member

class KerasZipWriter:
    """Writes a ``.keras`` like the reader's, with some tensors (or the config) replaced.

    The inner ``model.weights.h5`` is written by h5py straight into its (stored) zip
    member: its local header is reserved first and patched with size and CRC at the end,
    so the weights are written once. The central directory keeps the input's member order.
    """

    def __init__(self, reader: KerasZipReader, target):
        self.reader = reader
        self.target = Path(target)
        self._replace = {}
        self._tmp = atomic.temp_path(self.target)
        self._file = open(self._tmp, "w+b")  # cannot fail: temp_path just created it
        try:
            self._zip = zipfile.ZipFile(self._file, "w")
            info = next(i for i in reader.members if i.filename == WEIGHTS)
            self._winfo = zipfile.ZipInfo(WEIGHTS, info.date_time)
            self._winfo.compress_type, self._winfo.external_attr = zipfile.ZIP_STORED, info.external_attr
            self._winfo.header_offset = 0
            self._winfo.CRC = self._winfo.compress_size = self._winfo.file_size = 0
            self._file.write(self._winfo.FileHeader(zip64=True))
            self._data_start = self._file.tell()
            self._member = OffsetFile(self._file, self._data_start)
            self._h5 = KerasH5Writer(reader, [self.target], files=[self._member])
        except BaseException as exc:
            if getattr(self, "_zip", None) is not None:
                self._zip.fp = None
            self._file.close()
            atomic.discard(self._tmp)
            if isinstance(exc, OSError):
                raise WriteError(f"cannot write {self.target}: {exc.strerror or exc}") from None
            raise

    def write(self, name, array):
        self._h5.write(name, array)

    def copy_from(self, reader, name):
        self._h5.copy_from(reader, name)

    def set_member(self, member, data: bytes):
        """Replace a non-weights member (e.g. ``config.json``) with ``data``, or add a new
        one (e.g. ``surgeon/provenance.json``; Keras ignores unknown members)."""
        self._replace[member] = data

    def add_extra(self, path, array):
        """An extra dataset in the inner H5 (see ``KerasH5Writer.add_extra``)."""
        self._h5.add_extra(path, array)

    def finalize(self):
        try:
            self._h5._copy_rest()
            for out in self._h5._out:
                out.close()
            self._close_weights_member()
            self._write_rest()
            self._zip.close()
            self._file.close()
            atomic.commit(self._tmp, self.target)
        except (OSError, zipfile.BadZipFile, ValueError) as exc:
            self.abort()
            raise WriteError(f"cannot write {self.target}: {exc}") from None
        return self.target

    def _close_weights_member(self):
        """Patch the reserved local header with the member's size and CRC."""
        self._file.flush()
        size = os.fstat(self._file.fileno()).st_size - self._data_start
        crc = 0
        self._file.seek(self._data_start)
        left = size
        while left:
            block = self._file.read(min(left, 1 << 22))
            crc = fastio.crc32(block, crc)
            left -= len(block)
        w = self._winfo
        w.CRC, w.compress_size, w.file_size = crc, size, size
        self._file.seek(0)
        self._file.write(w.FileHeader(zip64=True))
        self._file.seek(self._data_start + size)
        self._zip.filelist.append(w)
        self._zip.NameToInfo[w.filename] = w
        self._zip.start_dir = self._data_start + size

    def _write_rest(self):
        dst = self._zip
        with zipfile.ZipFile(self.reader.zip_path) as src:
            for info in self.reader.members:
                if info.filename == WEIGHTS:
                    continue
                out = copy.copy(info)  # zipfile mutates it (header_offset); the reader's stays valid
                if info.filename in self._replace:
                    dst.writestr(out, self._replace[info.filename])
                else:
                    with src.open(info) as r, dst.open(out, "w", force_zip64=info.file_size > 2**31) as w:
                        shutil.copyfileobj(r, w, 1 << 22)
        known = {i.filename for i in self.reader.members}
        for member, data in self._replace.items():
            if member not in known:
                dst.writestr(zipfile.ZipInfo(member, (1980, 1, 1, 0, 0, 0)), data)
        order = {i.filename: k for k, i in enumerate(self.reader.members)}
        dst.filelist.sort(key=lambda i: order.get(i.filename, len(order)))

    def abort(self):
        self._zip.fp = None  # nothing more is written (ZipFile.close would add an end record)
        for out in getattr(self._h5, "_out", []):
            try:
                out.close()
            except Exception:
                pass
        try:
            self._file.close()
        except Exception:
            pass
        atomic.discard(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.abort()


def open_keras(path, model=None):
    if model is not None:
        raise SurgeonError("--model is only for bare weights files; a .keras file has its own config")
    return KerasZipReader(path)
