"""Start cloning the input early: the copy a clone-and-patch writer needs (see
``keras_patch``) begun in a background thread before h5py is imported and the input is
opened and planned. Light on purpose: imports no h5py, no numpy.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

from surgeon.core import atomic, fastio

WEIGHTS = "model.weights.h5"  # the .keras member holding the weights (as keras_zip.WEIGHTS)


class BackgroundClone:
    """A copy of ``src`` into a fresh temp file beside ``target``, made in a background
    thread, so that the copy (disk-bound: the writeback starts as it goes) overlaps the
    start-up of the run: importing h5py, opening and planning. A clone-and-patch writer
    opened later on the same ``src`` and ``target`` adopts it (``take``); otherwise the
    run ``discard``s it. The temp file is a normal ``atomic.temp_path``: a run killed
    meanwhile leaves a stale temp that the next write of the target removes."""

    def __init__(self, src, target):
        import threading

        self.src, self.target = Path(src), Path(target)
        self.tmp = atomic.temp_path(self.target)
        self._cancel = threading.Event()
        self._error = None
        self._taken = False
        self._thread = threading.Thread(target=self._run, name="surgeon-clone", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            fastio.copy_file(self.src, self.tmp, self._cancel)
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
    name = str(path)
    if name.endswith(".weights.h5"):
        return os.path.isfile(path)
    if not name.endswith(".keras") or not os.path.isfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    w = next((i for i in members if i.filename == WEIGHTS), None)
    return w is not None and w.compress_type == zipfile.ZIP_STORED and \
        all(i.header_offset < w.header_offset for i in members if i is not w)
