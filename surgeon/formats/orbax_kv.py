"""Orbax checkpoints on TensorStore kvstores (``gs://``, ``s3://``, ``file://``, ``memory://``
URLs or a kvstore spec): a small ``pathlib.Path`` look-alike, :class:`KvPath`, so the layout
code (``orbax_layout``) walks a bucket the way it walks a directory, every access going
through TensorStore (no ``os`` call on a URL).

Object stores have no rename, so a checkpoint there is published the way Orbax does on
GCS: everything is written in the final directory, then ``commit_success.txt`` last; a
directory without it is incomplete (Orbax skips it, surgeon refuses it). One process-wide
TensorStore context holds the cache settings (no cache: one array at a time), the request
retries (few: a bucket without credentials fails in seconds, not minutes) and the
``memory://`` stores (shared by every open in this process).
"""
from __future__ import annotations

import posixpath

COMMIT = "commit_success.txt"  # Orbax's commit marker (orbax.checkpoint atomicity_types)
_RETRIES = {"max_retries": 3, "initial_delay": "0.2s", "max_delay": "2s"}
_CONTEXT = []
_OPEN: dict = {}


def is_url(path) -> bool:
    """Whether ``path`` names a kvstore (a URL such as ``gs://b/ck`` or a spec dict)."""
    return isinstance(path, dict) or (isinstance(path, str) and "://" in path)


def context():
    """The process-wide TensorStore context (see the module docstring)."""
    if not _CONTEXT:
        from .orbax_layout import require_tensorstore
        ts = require_tensorstore()
        _CONTEXT.append(ts.Context({"cache_pool": {"total_bytes_limit": 0},
                                    "gcs_request_retries": _RETRIES,
                                    "s3_request_retries": _RETRIES}))
    return _CONTEXT[0]


def one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _base_spec(path) -> dict:
    from surgeon.core.errors import FormatError
    from .orbax_layout import require_tensorstore
    ts = require_tensorstore()
    try:
        spec = ts.KvStore.Spec(path).to_json()
    except Exception as exc:  # TensorStore: ValueError with a status text
        raise FormatError(f"{path}: not a TensorStore kvstore URL or spec: {one_line(exc)}") from None
    if "base" in spec or spec.get("driver") in ("ocdbt", "zarr", "zarr3"):
        raise FormatError(f"{path}: give the checkpoint's directory (a plain kvstore), "
                          "not an OCDBT or array spec")
    path = spec.get("path", "").rstrip("/")
    spec["path"] = path + "/" if path else ""
    return spec


class KvPath:
    """A directory or file inside a kvstore, named like a path (``KvPath('gs://b/ck') / '8'``)."""

    def __init__(self, path, _rel: str = "", _spec: dict | None = None, _label=None):
        self._spec = _spec if _spec is not None else _base_spec(path)  # the root given
        self.rel = _rel  # a key prefix below it ("" for the root itself)
        self._label = _label or (str(path).rstrip("/") if isinstance(path, str) else
                                 f"{self._spec.get('driver')}:{self._spec.get('path', '')}")

    # -- naming -------------------------------------------------------------------------
    def __truediv__(self, name) -> "KvPath":
        joined = posixpath.normpath(posixpath.join(self.rel, str(name)))
        if joined == "." or joined.startswith(".."):
            joined = "" if joined == "." else joined
        return KvPath(None, joined.strip("/"), self._spec, self._label)

    @property
    def name(self) -> str:
        return posixpath.basename(self.rel or self._spec.get("path", "").rstrip("/"))

    def relative_to(self, other: "KvPath") -> str:
        return posixpath.relpath(self.rel or ".", other.rel or ".")

    def resolve(self) -> "KvPath":
        return self

    def spec(self, key=None) -> dict:
        """The kvstore spec of this directory (or of ``key`` inside it)."""
        parts = [p.strip("/") for p in (self.rel, key) if p]
        return dict(self._spec, path=self._spec["path"] + "".join(p + "/" for p in parts))

    def __str__(self) -> str:
        return f"{self._label}/{self.rel}" if self.rel else self._label

    def __repr__(self) -> str:
        return f"KvPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, KvPath) and (self._spec, self.rel) == (other._spec, other.rel)

    def __hash__(self) -> int:
        return hash(self.rel)

    # -- access -------------------------------------------------------------------------
    def _kv(self):
        key = repr(sorted((k, repr(v)) for k, v in self._spec.items()))
        kv = _OPEN.get(key)
        if kv is None:
            from .orbax_layout import require_tensorstore
            ts = require_tensorstore()
            kv = _OPEN[key] = ts.KvStore.open(self._spec, context=context()).result()
        return kv

    def _call(self, what, fn):
        try:
            return fn()
        except (FileNotFoundError, IsADirectoryError):
            raise
        except Exception as exc:  # TensorStore: ValueError with a status (no credentials...)
            raise OSError(f"{self}: cannot {what}: {one_line(exc)}") from None

    def _list(self, prefix: str):
        from .orbax_layout import require_tensorstore
        ts = require_tensorstore()
        lo = prefix.encode()
        rng = ts.KvStore.KeyRange(lo, lo[:-1] + bytes([lo[-1] + 1])) if lo else ts.KvStore.KeyRange()

        def listed():
            try:
                return self._kv().list(rng).result()
            except ValueError as exc:  # the file driver: listing below a file
                if str(exc).startswith("NOT_FOUND"):
                    return []
                raise
        return [k.decode() for k in self._call("list", listed)]

    def is_file(self) -> bool:
        if not self.rel:  # the root given is a directory
            return False
        return self._call("read", lambda: self._kv().read(  # no data: existence only
            self.rel, byte_range=slice(0, 0)).result()).state == "value"

    def is_dir(self) -> bool:
        return bool(self._list(self.rel + "/" if self.rel else ""))

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self):
        prefix = self.rel + "/" if self.rel else ""
        names = sorted({k[len(prefix):].split("/", 1)[0] for k in self._list(prefix)})
        return iter([self / n for n in names if n])

    def walk_files(self):
        """Every file under this directory (relative names)."""
        prefix = self.rel + "/" if self.rel else ""
        return [k[len(prefix):] for k in self._list(prefix)]

    def read_bytes(self) -> bytes:
        if not self.rel:
            raise IsADirectoryError(f"{self}: a directory")
        r = self._call("read", lambda: self._kv().read(self.rel).result())
        if r.state != "value":
            raise FileNotFoundError(f"{self}: no such file")
        return bytes(r.value)

    def write_bytes(self, data: bytes) -> None:
        self._call("write", lambda: self._kv().write(self.rel, data).result())

    def unlink(self) -> None:
        from .orbax_layout import require_tensorstore
        key = self.rel.encode()
        rng = require_tensorstore().KvStore.KeyRange(key, key + b"\0")
        self._call("delete", lambda: self._kv().delete_range(rng).result())

    def mkdir(self, parents=False, exist_ok=False) -> None:
        """Nothing to do: a kvstore has no directories."""

    def remove_tree(self) -> None:
        """Delete every key under this directory (an aborted, uncommitted write)."""
        from .orbax_layout import require_tensorstore
        ts = require_tensorstore()
        lo = (self.rel + "/").encode() if self.rel else b""
        rng = ts.KvStore.KeyRange(lo, lo[:-1] + b"0") if lo else ts.KvStore.KeyRange()
        self._call("delete", lambda: self._kv().delete_range(rng).result())
        if self._spec.get("driver") == "file":  # the file driver leaves the directories
            import shutil
            shutil.rmtree(self.spec()["path"], ignore_errors=True)
