"""Crash-safe in-place edits of one file: writes collected in memory, then committed
through a rollback journal beside the file (the SQLite model).

An edit opens the file as an ``Overlay``: a file-like object whose reads see the file
and whose writes (and truncations) stay in memory, page by page. ``commit`` then finds
the byte ranges that really changed (a page rewritten with its old bytes costs nothing)
and:

1. writes ``<file>.surgeon-journal``: the old size and the old bytes of every changed
   range (and of everything past the new end), then a sha256 of the whole journal;
   fsyncs it and its directory;
2. writes the new bytes into the file, sets its size, fsyncs it;
3. removes the journal and fsyncs the directory.

A crash (SIGKILL, power loss) before the journal is complete leaves the file untouched
and a journal without a valid checksum, which ``recover`` simply deletes; a crash after
leaves a complete journal, which ``recover`` plays back (old bytes rewritten, old size
restored, fsync, journal removed): the file is the old version again, bit for bit.
Every surgeon command calls ``recover`` when it opens a file (``surgeon.formats.detect``)
and says so in one line on stderr. Only the bytes that change are written: an edit costs
the bytes it touches (twice, journal and file), not the size of the file.

``SURGEON_TEST_CRASH_AT=N[:half]`` (tests only) kills the process with SIGKILL at the
N-th step of ``commit`` (from 0: each write, truncate, fsync, unlink; ``:half`` writes half
of that write first), or at the first step of a kind (``journal``, ``patch``, ``truncate``,
``fsync``, ``unlink``), to check the invariant above (tests/test_inplace.py).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys
from pathlib import Path

import numpy as np

from .errors import SurgeonError, WriteError
from .rawfile import PositionedFile

SUFFIX = ".surgeon-journal"
MAGIC = b"SURGEON-JOURNAL\x01"
PAGE = 1 << 16
MERGE_GAP = 256  # changed spans closer than this are written as one


def journal_path(path) -> Path:
    return Path(str(path) + SUFFIX)


# -- the overlay: writes kept in memory until commit -------------------------------------
class Overlay(PositionedFile):
    """Read-write view of the file at ``path`` that never writes it: reads see the file
    with this object's writes and truncations applied; ``commit`` writes them."""

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)
        self._f = open(path, "rb")
        self.base_size = os.fstat(self._f.fileno()).st_size
        self.size = self.base_size
        self._limit = self.base_size  # base bytes at or past this offset read as zeros
        self._pages = {}
        self._diffs = {}  # page -> (end, differing span of the page), until it is written
        self._old_cache = {}

    # file protocol (h5py and zipfile use these; positions kept by PositionedFile)
    def writable(self):
        return True

    def _end(self):
        return self.size

    def _read_at(self, off, view):
        n = max(0, min(len(view), self.size - off))
        self._fill(off, view[:n])  # straight into the caller's buffer
        return n

    def _write_at(self, off, view):
        self.pwrite(off, view)
        return len(view)

    def truncate(self, size=None):
        size = self._pos if size is None else size
        if size < self.size:
            for i in [i for i in self._pages if i * PAGE >= size]:
                del self._pages[i]
            last = self._pages.get(size // PAGE)
            if last is not None:
                last[size % PAGE:] = bytes(PAGE - size % PAGE)
            self._diffs.clear()
            self._limit = min(self._limit, size)
        self.size = size
        return size

    def flush(self):
        pass

    def close(self):
        if not self.closed:
            self._f.close()
            self._pages.clear()
            self._old_cache.clear()
        super().close()

    # positioned access
    def _base_into(self, off, view):
        """Fill ``view`` with the file's bytes at ``off`` as the overlay sees them without
        its pages (zeros past ``_limit``): read straight into it, no intermediate copy."""
        n = len(view)
        n_real, got = max(0, min(n, self._limit - off)), 0
        while got < n_real:
            k = os.preadv(self._f.fileno(), [view[got:n_real]], off + got)
            if k == 0:
                break
            got += k
        if got < n:
            view[got:] = bytes(n - got)

    def _page(self, i, whole=False):
        p = self._pages.get(i)
        if p is None:
            p = bytearray(PAGE)
            if not whole:
                self._base_into(i * PAGE, memoryview(p))
            self._pages[i] = p
        return p

    def _fill(self, off, view):
        """Fill ``view`` with the overlay's bytes at ``off`` (within ``size``)."""
        n, pos = len(view), 0
        while pos < n:
            i, o = divmod(off + pos, PAGE)
            k = min(n - pos, PAGE - o)
            p = self._pages.get(i)
            if p is None:  # a run of pages not in memory: one read
                while pos + k < n and (off + pos + k) // PAGE not in self._pages:
                    k = min(n - pos, k + PAGE)
                self._base_into(off + pos, view[pos:pos + k])
            else:
                view[pos:pos + k] = memoryview(p)[o:o + k]
            pos += k

    def pread(self, off, n) -> bytearray:
        n = max(0, min(n, self.size - off))
        out = bytearray(n)
        self._fill(off, memoryview(out))
        return out

    def _old(self, off, n) -> bytes:
        """The file's own bytes [off, off + n) (cached: the file is not written before
        ``commit``, and ``changes`` is asked more than once)."""
        key = (off, n)
        if key not in self._old_cache:
            self._old_cache[key] = os.pread(self._f.fileno(), n, off)
        return self._old_cache[key]

    def pwrite(self, off, data):
        data = memoryview(data).cast("B")
        if off > self.size:  # a hole reads as zeros
            self.truncate(self.size)
        pos = 0
        while pos < len(data):
            i, o = divmod(off + pos, PAGE)
            k = min(len(data) - pos, PAGE - o)
            self._page(i, whole=(o == 0 and k == PAGE))[o:o + k] = data[pos:pos + k]
            self._diffs.pop(i, None)
            pos += k
        self.size = max(self.size, off + len(data))

    # what changed
    def changes(self, lo=0, hi=None):
        """``(spans, tail)``: ``spans`` = [(offset, old bytes, new bytes)] inside the part of
        the file kept as it was (below ``tail``; only pages between ``lo`` and ``hi`` when
        given), merged when close; ``tail``: the offset from which the old content is
        dropped (the file is cut there, then the new bytes past it appended)."""
        tail = min(self._limit, self.base_size)
        end = min(tail, self.size, hi if hi is not None else tail)
        pages = [i for i in sorted(self._pages) if lo // PAGE <= i and i * PAGE < end]
        for run in _runs([i for i in pages if self._diffs.get(i, (None,))[0] != end], 256):
            self._compare(run, end)  # consecutive pages, 16 MB at a time
        spans = []
        for i in pages:
            span = self._diffs[i][1]
            if span is None:
                continue
            a, b = i * PAGE + span[0], i * PAGE + span[1]
            if spans and a - spans[-1][1] < MERGE_GAP:
                spans[-1][1] = b
            else:
                spans.append([a, b])
        out = [(a, self._old(a, b - a), self.pread(a, b - a)) for a, b in spans]
        return out, tail

    def _compare(self, run, end):
        """Record, for each page of ``run`` (below ``end``), the span of its bytes that
        differ from the file's (None: none): the first and last differing bytes for pages
        at the edges of a changed stretch, the whole page inside one. Pages are compared
        whole (``memcmp``); only a changed page at an edge is looked at byte by byte."""
        start, stop = run[0] * PAGE, min((run[-1] + 1) * PAGE, end)
        old = memoryview(os.pread(self._f.fileno(), stop - start, start))
        changed = []
        for k, i in enumerate(run):
            a, b = k * PAGE, min((k + 1) * PAGE, stop - start)
            page = self._pages[i]
            changed.append((page if b - a == PAGE else page[:b - a]) != old[a:b])
        for k, i in enumerate(run):
            span = None
            if changed[k]:
                inner = 0 < k < len(run) - 1 and changed[k - 1] and changed[k + 1]
                if inner:
                    span = (0, PAGE)
                else:
                    a, b = k * PAGE, min((k + 1) * PAGE, stop - start)
                    row = np.frombuffer(self._pages[i], np.uint8, b - a) != \
                        np.frombuffer(old[a:b], np.uint8)
                    span = (int(row.argmax()), b - a - int(row[::-1].argmax()))
            self._diffs[i] = (end, span)


def _runs(pages, most):
    """Split sorted page numbers into runs of consecutive pages, at most ``most`` long."""
    run = []
    for i in pages:
        if run and (i != run[-1] + 1 or len(run) == most):
            yield run
            run = []
        run.append(i)
    if run:
        yield run


# -- commit -------------------------------------------------------------------------------
_steps = 0


def _step(fn, *args):
    """Run one I/O step of ``commit`` (the test crash hook counts them)."""
    global _steps
    at = os.environ.get("SURGEON_TEST_CRASH_AT")
    if at:
        n, _, how = at.partition(":")
        if (_steps == int(n)) if n.isdigit() else (_KIND.get(fn) == n):
            if how == "half" and fn in (_write_all, _pwrite_all):
                fn(*args[:1], args[1][:len(args[1]) // 2], *args[2:])
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
        _steps += 1
    return fn(*args)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pwrite_all(fd, data, off):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


def _fsync_dir(path: Path, step=_step):
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        step(os.fsync, fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _journal_bytes(old_size, spans, tail) -> list:
    """The journal as a list of byte strings (written one after the other)."""
    head = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "old_size": old_size,
                       "ranges": len(spans) + 1}).encode()
    parts = [MAGIC + struct.pack("<Q", len(head)) + head]
    for off, old, _ in spans:
        parts.append(struct.pack("<QQ", off, len(old)))
        parts.append(old)  # as it is (no concatenated copy)
    parts.append(struct.pack("<QQ", tail, old_size - tail))  # the dropped tail, read below
    return parts


def commit(overlay: Overlay) -> int:
    """Write ``overlay``'s changes into its file through the rollback journal; the number
    of bytes written into the file."""
    path = overlay.path
    spans, tail = overlay.changes()
    old_size, new_size = overlay.base_size, overlay.size
    new_tail = overlay.pread(tail, new_size - tail) if new_size > tail else b""
    if not spans and tail == old_size and new_size == old_size:
        return 0
    old_tail = os.pread(overlay._f.fileno(), old_size - tail, tail)
    jpath = journal_path(path)
    parts = _journal_bytes(old_size, spans, tail)
    parts[-1] += old_tail
    import hashlib
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    digest = h.digest()
    try:
        jfd = os.open(jpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise WriteError(f"{path}: another in-place edit is in progress ({jpath} exists); "
                         "wait for it, or run `surgeon ls` on the file to recover") from None
    except OSError as exc:
        raise WriteError(f"{path}: cannot create the journal {jpath}: "
                         f"{exc.strerror or exc}") from None
    try:
        for part in parts + [digest]:
            _step(_write_all, jfd, part)
        _step(os.fsync, jfd)
    finally:
        os.close(jfd)
    _fsync_dir(jpath)
    fd = os.open(path, os.O_WRONLY)
    written = 0
    try:
        for off, _, new in spans:
            _step(_pwrite_all, fd, new, off)
            written += len(new)
        if new_tail:
            _step(_pwrite_all, fd, new_tail, tail)
            written += len(new_tail)
        _step(os.ftruncate, fd, new_size)
        _step(os.fsync, fd)
    finally:
        os.close(fd)
    _step(os.unlink, jpath)
    _fsync_dir(jpath)
    return written


_KIND = {_write_all: "journal", _pwrite_all: "patch", os.ftruncate: "truncate",
         os.fsync: "fsync", os.unlink: "unlink"}  # names for SURGEON_TEST_CRASH_AT


# -- recovery -----------------------------------------------------------------------------
def _parse(raw: bytes):
    """``(header, [(offset, old bytes)])`` of a complete journal, None when incomplete."""
    import hashlib
    if len(raw) < len(MAGIC) + 8 + 32 or not raw.startswith(MAGIC):
        return None
    body, digest = raw[:-32], raw[-32:]
    if hashlib.sha256(body).digest() != digest:
        return None
    pos = len(MAGIC)
    (n,) = struct.unpack_from("<Q", body, pos)
    head = json.loads(body[pos + 8:pos + 8 + n])
    pos += 8 + n
    ranges = []
    while pos < len(body):
        off, k = struct.unpack_from("<QQ", body, pos)
        ranges.append((off, body[pos + 16:pos + 16 + k]))
        pos += 16 + k
    return head, ranges


def _alive_elsewhere(head) -> bool:
    """True when the journal's writer is another live process on this host."""
    pid = head.get("pid")
    if head.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def recover(path, say=True) -> str | None:
    """Roll back an interrupted in-place edit of ``path`` when its journal exists: the old
    bytes are written back, the old size restored, the file fsynced, the journal removed.
    Returns what was done (also printed on stderr when ``say``), None when there was no
    journal. A journal left incomplete (the crash came before the file was touched) is
    just removed."""
    jpath = journal_path(path)
    try:
        raw = jpath.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SurgeonError(f"{path}: cannot read its journal {jpath}: {exc.strerror or exc}") from None
    parsed = _parse(raw)
    try:
        if parsed is None:
            what = f"removed the incomplete journal of an interrupted in-place edit ({jpath}); the file was not touched"
        else:
            head, ranges = parsed
            if _alive_elsewhere(head):
                raise SurgeonError(f"{path}: process {head['pid']} is editing it in place "
                                   f"({jpath}); wait for it to finish")
            fd = os.open(path, os.O_WRONLY)
            try:
                for off, old in ranges:
                    _pwrite_all(fd, old, off)
                os.ftruncate(fd, head["old_size"])
                os.fsync(fd)
            finally:
                os.close(fd)
            what = f"rolled back an interrupted in-place edit (journal {jpath})"
        os.unlink(jpath)
        _fsync_dir(jpath, lambda fn, *a: fn(*a))
    except OSError as exc:
        raise SurgeonError(f"{path}: an interrupted in-place edit must be rolled back from "
                           f"{jpath} but: {exc.strerror or exc}; make the file writable and "
                           "run `surgeon ls` on it") from None
    if say:
        print(f"surgeon: {path}: {what}", file=sys.stderr)
    return what
