"""Start cloning the input early: the copy a clone-and-patch writer needs (see
``keras_patch``) begun in a background thread before h5py is imported and the input is
opened and planned. Light on purpose: imports no h5py, no numpy.
"""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from surgeon.core import atomic, fastio

WEIGHTS = "model.weights.h5"  # the .keras member holding the weights (as keras_zip.WEIGHTS)


class BackgroundClone:
    """A copy of ``src`` (its first ``length`` bytes: see ``clone_length``; None: all of
    it) into a fresh temp file beside ``target``, made in a background thread, so that
    the copy (disk-bound: the writeback starts as it goes) overlaps the start-up of the
    run: importing h5py, opening and planning. A clone-and-patch writer
    opened later on the same ``src`` and ``target`` adopts it (``take``); otherwise the
    run ``discard``s it. The temp file is a normal ``atomic.temp_path``: a run killed
    meanwhile leaves a stale temp that the next write of the target removes."""

    def __init__(self, src, target, length=None):
        import threading

        self.src, self.target, self.length = Path(src), Path(target), length
        self.tmp = atomic.temp_path(self.target)
        self._cancel = threading.Event()
        self._error = None
        self._taken = False
        self._thread = threading.Thread(target=self._run, name="surgeon-clone", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            fastio.copy_file(self.src, self.tmp, self._cancel, self.length)
        except BaseException as exc:  # re-raised by take() in the main thread
            self._error = exc

    def matches(self, src, target) -> bool:
        return not self._taken and _same(self.src, src) and \
            Path(target).resolve() == self.target.resolve()

    def take(self) -> Path:
        """Wait for the copy; the temp file now belongs to the caller."""
        self._thread.join()
        self._taken = True
        if self._error is not None:
            raise self._error
        return self.tmp

    def discard(self):
        """Stop the copy and remove the temp file, unless a writer took it."""
        if not self._taken:
            self._cancel.set()
            self._thread.join()
            self._taken = True
            atomic.discard(self.tmp)


def _same(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or Path(a).samefile(b)
    except OSError:
        return False


def may_patch(path) -> bool:
    """Cheap guess, before opening ``path``, that its output will be cloned and patched:
    a ``.keras`` whose weights member is stored last, or a ``.weights.h5`` file."""
    return clone_length(path) is not False


def clone_length(path):
    """How much of ``path`` a clone-and-patch writer needs copied: None for all of it (a
    ``.weights.h5``), the end of the weights member's data for a ``.keras`` whose
    weights member is stored last (what follows, the members after it and the central
    directory, is rewritten), False when the output will not be a patched clone."""
    name = str(path)
    if name.endswith(".weights.h5"):
        return None if os.path.isfile(path) else False
    if not name.endswith(".keras") or not os.path.isfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
        w = next((i for i in members if i.filename == WEIGHTS), None)
        if w is None or w.compress_type != zipfile.ZIP_STORED or \
                not all(i.header_offset < w.header_offset for i in members if i is not w):
            return False
        return member_end(path, w)
    except (OSError, zipfile.BadZipFile, ValueError, struct.error):
        return False


def member_data_offset(path, info) -> int:
    """Offset of the stored member ``info``'s data in the zip at ``path`` (past its local
    header); ValueError when the local header is not one."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise ValueError(f"bad local header for {info.filename}")
    n, m = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + n + m


def member_end(path, info) -> int:
    """Offset of the end of the stored member ``info``'s data in the zip at ``path``."""
    return member_data_offset(path, info) + info.compress_size


class EarlyStart:
    """What a command can start from its command line alone, before the recipe is loaded
    and numpy, h5py and the ops are imported: hashing the inputs (``hasher``, a
    ``provenance.Hasher``) and cloning ``src`` into ``target``'s temp file (``clone``, a
    ``BackgroundClone``, or None). ``apply`` adopts them when they fit what it plans
    (``take_clone``); whatever is left is stopped and removed on ``close``. Light: no
    numpy, no h5py."""

    def __init__(self, hash_paths=(), hash_inputs=True, src=None, target=None):
        from .provenance import Hasher
        self.hasher = Hasher(hash_inputs)
        self.clone = None
        try:
            for p in hash_paths:
                if p and os.path.isfile(p):
                    self.hasher.start(p)
            length = _clonable(src, target) if src and target else False
            if length is not False:
                self.clone = BackgroundClone(src, target, length)
        except BaseException:
            self.close()
            raise

    def take_clone(self, src, target):
        """The early clone when it is a copy of ``src`` for ``target`` (else it is stopped
        and removed): None when there is none."""
        clone, self.clone = self.clone, None
        if clone is not None and not clone.matches(src, target):
            clone.discard()
            clone = None
        return clone

    def close(self):
        if self.clone is not None:
            self.clone.discard()
            self.clone = None
        self.hasher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _clonable(src, target):
    """Worth cloning before anything is planned: ``target`` is a new path in an existing
    directory, not an input, and ``src`` a file the patch writers clone; the length to
    copy (``clone_length``), False when not."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(target))) or os.path.isdir(target):
        return False
    try:
        atomic.check_output(target, [src])
    except Exception:  # refused: apply says why, later, in one line
        return False
    return clone_length(src)
