"""Write beside the target, then rename into place: a crash never leaves a half file.

Every output is checked against the inputs first (``check_output``): no command can
replace or modify the checkpoint it reads. Outputs get the mode a plain ``cp`` gives
(``publish_mode``): a new file 0666 & ~umask, a directory 0777 & ~umask; an existing
target keeps its mode.

Temporary files are named ``.<target name>.<host>-<pid>.<random>.surgeon-tmp[suffix]`` in
the target's directory (same filesystem, so the final rename is atomic). A run killed
mid-write (SIGKILL, power loss) leaves its temp file behind but never touches the target
or the input. The next successful write of the same target removes such leftovers:
temps of that target created on this host by a process that no longer exists. Temps of
live processes (a concurrent write) and of other hosts are left alone.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

MARK = ".surgeon-tmp"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"


def temp_path(target: Path, suffix: str = "") -> Path:
    """A fresh temporary path in the target's directory (same filesystem -> atomic rename)."""
    target = Path(target)
    check_output(target)
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
    check_output(target)
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
    ``target`` left by killed runs. Refuses a target that is an input; the output gets
    the mode a plain ``cp`` would give it."""
    check_output(target)
    publish_mode(tmp, target)
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


def umask() -> int:
    """The process umask (read from /proc when possible: setting it is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path, target=None) -> None:
    """Give ``path`` (about to become ``target``) the mode ``cp`` would: an existing target's
    mode is kept; a new file gets 0666 & ~umask, a new directory 0777 & ~umask."""
    path = Path(path)
    is_dir = path.is_dir() and not path.is_symlink()
    try:
        old = os.stat(target) if target is not None else None
    except OSError:
        old = None
    if old is not None and os.path.isdir(target) == is_dir:
        mode = old.st_mode & 0o7777
    else:
        mode = (0o777 if is_dir else 0o666) & ~umask()
    os.chmod(path, mode)


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


# -- no output is ever an input -------------------------------------------------------------
# Every checkpoint opened for reading (``surgeon.open_checkpoint``) is registered here while it
# is open, and entry points may name further inputs (``--model``, ``--like``). Every write
# goes through ``temp_path``/``temp_dir``/``commit``, which refuse a target that is an input:
# the same file under any name (``./x``, a symlink, a hard link), a file inside an input
# directory (TF checkpoint directory, SavedModel), or a directory holding an input.
_INPUTS: dict = {}
_LOCK = threading.Lock()
_TOKENS = itertools.count(1)


@dataclass(frozen=True)
class _Input:
    path: str  # as given, for messages
    reals: tuple  # realpaths of the input and of every file that makes it up
    inodes: frozenset  # (st_dev, st_ino) of those files
    dirs: tuple  # realpaths of input directories (nothing may be written inside them)


def _input_files(path: Path) -> list:
    """The files making up checkpoint ``path``: the file; a sharded index and its shards;
    every file below a directory; a TF prefix's ``.index`` and ``.data-*`` files."""
    if path.is_dir():
        return [path] + [p for p in path.rglob("*")]
    files = [path] if path.exists() else []
    name = path.name
    if name.endswith(".index") or not files:
        prefix = path.with_name(name[: -len(".index")]) if name.endswith(".index") else path
        files += [p for p in [prefix.with_name(prefix.name + ".index")] if p.exists()]
        files += sorted(prefix.parent.glob(glob.escape(prefix.name) + ".data-*"))
    if name.endswith(".weights.json") and files:
        try:
            index = json.loads(path.read_text())
            shards = {f for v in index.get("weight_map", {}).values()
                      for f in (v if isinstance(v, list) else [v])}
            files += [path.with_name(s) for s in sorted(shards) if path.with_name(s).exists()]
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    return files


def describe_input(path) -> _Input:
    path = Path(path)
    files = _input_files(path)
    inodes = set()
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue
        inodes.add((st.st_dev, st.st_ino))
    reals = tuple({os.path.realpath(path)} | {os.path.realpath(f) for f in files})
    dirs = (os.path.realpath(path),) if path.is_dir() else ()
    return _Input(str(path), reals, frozenset(inodes), dirs)


def protect(path) -> int:
    """Register ``path`` as an input of this process until ``release(token)``."""
    inp = describe_input(path)
    with _LOCK:
        token = next(_TOKENS)
        _INPUTS[token] = inp
    return token


def release(token) -> None:
    with _LOCK:
        _INPUTS.pop(token, None)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _why(target: Path, real: str, st, inp: _Input):
    if st is not None and (st.st_dev, st.st_ino) in inp.inodes or real in inp.reals:
        return "the same file"
    for d in inp.dirs:
        if _within(real, d):
            return "inside the input directory"
    if any(r != real and _within(r, real) for r in inp.reals):
        return "a directory holding the input"
    return None


def check_output(target, inputs=()) -> None:
    """Refuse (``WriteError``) when writing ``target`` would replace or modify an input: the
    registered open checkpoints, plus ``inputs`` (paths; None entries are ignored)."""
    with _LOCK:
        known = list(_INPUTS.values())
    known += [describe_input(p) for p in inputs
              if p is not None and (os.path.lexists(p) or os.path.exists(f"{p}.index"))]
    if not known:
        return
    target = Path(target)
    real = os.path.realpath(target)
    try:
        st = os.stat(target)
    except OSError:
        st = None
    for inp in known:
        why = _why(target, real, st, inp)
        if why:
            from .errors import WriteError
            named = "" if os.path.normpath(str(target)) == os.path.normpath(inp.path) \
                else f" {inp.path}"
            raise WriteError(f"{target}: output is the input{named} ({why}); "
                             "choose another output path")
