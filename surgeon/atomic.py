"""Write beside the target, then rename into place: a crash never leaves a half file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_path(target: Path, suffix: str = "") -> Path:
    """A fresh temporary path in the target's directory (same filesystem -> atomic rename)."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".surgeon-tmp{suffix}",
                                dir=target.parent)
    os.close(fd)
    return Path(name)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, target: Path) -> None:
    """fsync ``tmp`` and atomically rename it onto ``target``."""
    fsync_path(tmp)
    os.replace(tmp, target)
    try:
        dfd = os.open(Path(target).parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def discard(*paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except (FileNotFoundError, TypeError):
            pass
