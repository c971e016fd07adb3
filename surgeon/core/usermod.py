"""A user's Python module, imported once per process: ``pkg.module`` or ``path/to/file.py``.

Used by ``surgeon --import`` (modules that register Keras classes, so that custom layers
and subclassed models get their variables' Keras names) and by ``resume --data/--model``.
A failure is one ``SurgeonError`` line naming the module, never a traceback.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from surgeon.core.errors import SurgeonError


def is_path(mod_part: str) -> bool:
    """Whether ``mod_part`` names a file (``x.py`` or a path) rather than a module name."""
    return mod_part.endswith(".py") or "/" in mod_part


def import_module(mod_part: str, what: str, spec: str | None = None):
    """The module ``mod_part`` (a module name or a ``.py`` path), imported at most once per
    process: a file is loaded under a name derived from its resolved path, so a second
    request (the module imported early to register its classes, then asked for a function)
    does not run it again. ``what``/``spec`` name the option in errors."""
    spec = spec or mod_part
    if not is_path(mod_part):
        try:
            return importlib.import_module(mod_part)
        except ImportError as exc:
            raise SurgeonError(f"{spec}: {what}: cannot import {mod_part}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the user's code failed: say so in one line
            raise SurgeonError(f"{spec}: {what}: importing {mod_part} failed: "
                               f"{type(exc).__name__}: {exc}") from None
    path = Path(mod_part)
    if not path.is_file():
        raise SurgeonError(f"{spec}: {what}: no such file {path}")
    name = f"surgeon_user_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's code failed: say so in one line
            del sys.modules[name]
            raise SurgeonError(f"{spec}: {what}: importing {path} failed: {exc}") from None
    return module
