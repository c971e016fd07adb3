"""Write beside the target, then rename into place: a crash never leaves a half file.

Temporary files are named ``.<target name>.<host>-<pid>.<random>.surgeon-tmp[suffix]`` in
the target's directory (same filesystem, so the final rename is atomic). A run killed
mid-write (SIGKILL, power loss) leaves its temp file behind but never touches the target
or the input. The next successful write of the same target removes such leftovers:
temps of that target created on this host by a process that no longer exists. Temps of
live processes (a concurrent write) and of other hosts are left alone.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

MARK = ".surgeon-tmp"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"


def temp_path(target: Path, suffix: str = "") -> Path:
    """A fresh temporary path in the target's directory (same filesystem -> atomic rename)."""
    target = Path(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.{_host()}-{os.getpid()}.",
                                    suffix=f"{MARK}{suffix}", dir=target.parent)
    except OSError as exc:
        from .errors import WriteError
        raise WriteError(f"{target}: cannot create a file in {target.parent}: "
                         f"{exc.strerror or exc}") from None
    os.close(fd)
    return Path(name)


def temp_dir(target: Path) -> Path:
    """A fresh temporary directory beside ``target`` (for multi-file outputs), named like
    ``temp_path`` so that ``clean_stale(target)`` recognises it after a crash."""
    target = Path(target)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.{_host()}-{os.getpid()}.",
                                     suffix=MARK, dir=target.parent))
    except OSError as exc:
        from .errors import WriteError
        raise WriteError(f"{target}: cannot create a directory in {target.parent}: "
                         f"{exc.strerror or exc}") from None


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, target: Path) -> None:
    """fsync ``tmp``, atomically rename it onto ``target``, then remove stale temps of
    ``target`` left by killed runs."""
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
    clean_stale(target)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def stale_temps(target) -> list:
    """Temp files (or dirs) of ``target`` whose creating process on this host is gone."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:.+\.)?{_host()}-(\d+)\.[^.]+"
                         rf"{re.escape(MARK)}")
    out = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return out
    for name in names:
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            out.append(target.parent / name)
    return out


def clean_stale(target) -> None:
    """Remove ``stale_temps(target)``; never fails (cleanup is best effort)."""
    for p in stale_temps(target):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
        except OSError:
            pass


def discard(*paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except (FileNotFoundError, TypeError):
            pass
