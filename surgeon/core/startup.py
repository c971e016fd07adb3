"""Start-up costs of the command line that are not surgeon's own work.

``no_uname_child()``: importing h5py (3.x, its ``h5t`` module) reads ``platform.uname()[4]``
(the machine). On Python 3.9+ indexing ``platform.uname()`` computes every field,
``processor`` included, and on Linux that runs ``uname -p`` in a child process: a fork of
the interpreter with numpy loaded and an exec, ~30 ms of CPU and ~50 ms of wall time of
every command that reads an H5 file, for a field h5py does not use. ``install()`` (called
by the CLI, once) makes the first ``import h5py`` see ``platform.uname`` answer from
``os.uname()`` (the same system, node, release, version and machine) for the duration of
that import only; ``platform.uname()`` is the real one before and after, and
``platform.processor()`` still runs ``uname -p`` when someone asks for it.
"""
from __future__ import annotations

import os
import sys

_PKG = "h5py"


class _MachineOnly(tuple):
    """What h5py reads of ``platform.uname()`` during its import: the five ``os.uname()``
    fields by index and by name; ``processor`` (a sixth field, from a child process) is
    not computed."""

    def __new__(cls):
        u = os.uname()
        self = super().__new__(cls, (u.sysname, u.nodename, u.release, u.version, u.machine))
        self.system, self.node, self.release, self.version, self.machine = self
        return self


class _H5pyImport:
    """A ``sys.meta_path`` finder for the top-level ``h5py`` package only: finds it as the
    other finders would, and runs its module code with ``platform.uname`` answering from
    ``os.uname()``. Removes itself at its first use."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _PKG:
            return None
        uninstall()
        import importlib.util
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        spec.loader = _Loader(loader)
        return spec


class _Loader:
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._inner  # (h5py sees its real loader)
        import platform
        real = platform.uname
        platform.uname = _MachineOnly
        try:
            self._inner.exec_module(module)
        finally:
            platform.uname = real

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._inner, name)


def install() -> None:
    """Make the first ``import h5py`` of this process run no child process (see above);
    a no-op when h5py is already imported, or off Linux."""
    if _PKG in sys.modules or sys.platform != "linux":
        return
    if _H5pyImport not in sys.meta_path:
        sys.meta_path.insert(0, _H5pyImport)


def uninstall() -> None:
    try:
        sys.meta_path.remove(_H5pyImport)
    except ValueError:
        pass
