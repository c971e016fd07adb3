"""Provenance: every output carries its surgery log, chained with its inputs' own logs.

The log is a JSON list of records (oldest first). It is stored where the format has
room: the zip member ``surgeon/provenance.json`` of a ``.keras`` file, the extra H5
dataset ``surgeon/provenance`` of a ``.weights.h5`` (first shard when sharded), the file
``surgeon_provenance.json`` in an Orbax step directory. Keras and Orbax ignore them.
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import json
import threading
import zipfile
from pathlib import Path

from surgeon.core.errors import SurgeonError

MEMBER = "surgeon/provenance.json"
H5_KEY = "surgeon/provenance"


HASH_ENV = "SURGEON_HASH"  # sha256 or blake3: the content hash of the inputs in new records


def hash_algorithm() -> str:
    """The content hash recorded for the inputs: ``$SURGEON_HASH`` when set (``sha256`` or
    ``blake3``), else BLAKE3 when the ``blake3`` package is installed (the ``fasthash``
    extra: ~2x less CPU), else sha256. A record names it: the input's digest is stored
    under the algorithm's name (``"blake3": hex``; ``"sha256"`` is then null)."""
    import os
    want = os.environ.get(HASH_ENV, "").strip().lower()
    if want and want not in ("sha256", "blake3"):
        raise SurgeonError(f"{HASH_ENV}={want!r}: use sha256 or blake3")
    if want == "sha256":
        return "sha256"
    import importlib.util  # (found, not imported: the hashing thread imports it)
    if importlib.util.find_spec("blake3") is None:
        if want == "blake3":
            raise SurgeonError(f"{HASH_ENV}=blake3 needs the blake3 package: "
                               "pip install 'surgeon[fasthash]'")
        return "sha256"
    return "blake3"


def input_digest(entry: dict):
    """``(algorithm, hex digest)`` of one recorded input (any version of the log: older
    records have only ``sha256``), or None when it was not hashed."""
    for algorithm in ("sha256", "blake3"):
        if entry.get(algorithm):
            return algorithm, entry[algorithm]
    return None


def file_sha256(path, cancel=None) -> str:
    """sha256 of one file (over an mmap: see ``surgeon.core.fastio``)."""
    from surgeon.core.fastio import sha256_file
    return sha256_file(path, cancel)


def checkpoint_files(path) -> list:
    """The files making up a checkpoint (shards of a sharded index included)."""
    path = Path(path)
    if path.name.endswith(".weights.json"):
        index = json.loads(path.read_text())
        names = sorted({f for v in index.get("weight_map", {}).values()
                        for f in (v if isinstance(v, list) else [v])})
        return [path] + [path.with_name(n) for n in names]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if not path.exists() or path.name.endswith(".index"):  # a TF prefix: index and data files
        prefix = str(path)[: -len(".index")] if path.name.endswith(".index") else str(path)
        files = sorted(Path(prefix).parent.glob(glob.escape(Path(prefix).name) + ".data-*"))
        return [Path(prefix + ".index")] + files if Path(prefix + ".index").exists() else [path]
    return [path]


def content_hash(path, cancel=None, algorithm="sha256") -> str:
    """Digest of the checkpoint's file (or of its files' digests, for multi-file ones); None
    for a kvstore URL (gs://...: hashing would download it)."""
    if "://" in str(path):
        return None
    from surgeon.core.fastio import hash_file, new_hash
    files = checkpoint_files(path)
    if len(files) == 1:
        return hash_file(files[0], algorithm, cancel)
    h = new_hash(algorithm)
    for f in files:
        h.update(f"{f.name}:{hash_file(f, algorithm, cancel)}\n".encode())
    return h.hexdigest()


def digest_fields(digest, algorithm) -> dict:
    """The hash fields of one input record: ``sha256`` always (null unless it is the
    algorithm: readers of older logs look there), and the algorithm's own key."""
    return {"sha256": digest if algorithm == "sha256" else None} | \
        ({algorithm: digest} if algorithm != "sha256" else {})


def read_log(path) -> list:
    """The surgery history stored in a checkpoint (oldest first); [] when it has none."""
    from surgeon.formats import detect, is_url
    path = path if is_url(path) else Path(path)
    fmt = detect(path)
    if fmt == "keras":
        with zipfile.ZipFile(path) as zf:
            if MEMBER not in zf.namelist():
                return []
            return json.loads(zf.read(MEMBER))
    if fmt in ("keras-weights-h5", "keras-weights-sharded", "legacy-h5"):
        import h5py
        first = checkpoint_files(path)[1 if fmt == "keras-weights-sharded" else 0]
        with h5py.File(first, "r") as f:
            if H5_KEY not in f:
                return []
            raw = f[H5_KEY][()]
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    if fmt == "orbax":
        from .orbax_layout import PROVENANCE, locate
        where = locate(path)
        log = (where.step_dir or where.item) / PROVENANCE
        return json.loads(log.read_bytes()) if log.exists() else []
    return []


class Hasher:
    """Content hashes computed in background threads (hashing releases the GIL), so hashing
    a large input overlaps with cloning and editing it; two inputs (a transplant's target
    and source) are hashed side by side when the machine has two cores."""

    def __init__(self, enabled=True, algorithm=None):
        self.enabled = enabled
        self.algorithm = (algorithm or hash_algorithm()) if enabled else "sha256"
        self._pool = None  # started with the first hash
        self._jobs = {}
        self._cancel = threading.Event()
        self.skip = set()  # paths recorded without a hash (a file edited in place)

    def start(self, path):
        if "://" in str(path):  # a kvstore URL (gs://...): not hashed (a full download)
            self.skip.add(str(path))
        if self.enabled and str(path) not in self._jobs and str(path) not in self.skip:
            if self._pool is None:
                import os
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
            self._jobs[str(path)] = self._pool.submit(content_hash, path, self._cancel, self.algorithm)

    def get(self, path):
        if not self.enabled or str(path) in self.skip:
            return None
        self.start(path)
        return self._jobs[str(path)].result()

    def close(self):
        """Stop: hashes not asked for are abandoned (a failed run does not wait for them)."""
        if self._pool:
            self._cancel.set()
            self._pool.shutdown(wait=True, cancel_futures=True)


def make_record(recipe, plan, inputs: dict, version: str, hash_inputs=True) -> dict:
    """One log record: tool, recipe text and hash, inputs with content hashes, plan, time.

    ``hash_inputs`` is a bool or a ``Hasher`` already working on the inputs."""
    if isinstance(hash_inputs, Hasher):
        get, algorithm = hash_inputs.get, hash_inputs.algorithm
    else:
        algorithm = hash_algorithm() if hash_inputs else "sha256"
        get = (lambda p: content_hash(p, algorithm=algorithm)) if hash_inputs else (lambda p: None)
    text = recipe.text or ""
    path = str(recipe.path or "")
    command = path.split()[1] if path.startswith("surgeon ") and len(path.split()) > 1 else "apply"
    return {
        "tool": "surgeon", "version": version,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "arguments": {"recipe": recipe.path, "input": str(recipe.input), "output": plan.output},
        "recipe": {"path": recipe.path, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                   "text": text},
        "inputs": [{"role": role, "path": str(p)} | digest_fields(get(p), algorithm)
                   | {"history": read_log(p) if role != "input" else None}
                   for role, p in inputs.items()],
        "plan": plan.to_json(),
    }


def command_record(command: str, arguments: dict, inputs: dict, summary: dict,
                   structural=(), hash_inputs=True) -> dict:
    """One log record for a command other than ``apply``: what ran (command, arguments),
    on what (inputs with content hashes) and what it did (``summary``; ``structural``:
    structural plans, as ``surgeon log`` shows them). ``hash_inputs``: a bool or a
    ``Hasher`` already working on the inputs."""
    from surgeon.core import __version__
    hasher = hash_inputs if isinstance(hash_inputs, Hasher) else None
    algorithm = hasher.algorithm if hasher else (hash_algorithm() if hash_inputs else "sha256")
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in arguments.items()
            if v is not None and v is not False}
    text = " ".join([f"surgeon {command}"] + [f"--{k.replace('_', '-')}={v}" for k, v in args.items()])
    return {
        "tool": "surgeon", "version": __version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "arguments": args, "summary": summary,
        "recipe": {"path": f"surgeon {command}",
                   "sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text},
        "inputs": [{"role": role, "path": str(p)}
                   | digest_fields(hasher.get(p) if hasher else
                                   (content_hash(p, algorithm=algorithm) if hash_inputs else None),
                                   algorithm)
                   | {"history": _history(p) if role != "input" else None}
                   for role, p in inputs.items() if p is not None],
        "plan": {"steps": [], "structural": list(structural), "iteration": None},
    }


def _history(path):
    try:
        return read_log(path)
    except (SurgeonError, OSError, ValueError, KeyError, zipfile.BadZipFile):
        return []


def chained(input_path, record) -> list:
    """``record`` after ``input_path``'s own history (the log an output of it carries)."""
    return _history(input_path) + [record]


def embed_file(path, fmt: str, history: list) -> bool:
    """Store ``history`` in a file already written (e.g. by Keras' saver, before it is
    renamed into place); False when the format has no room."""
    data = json.dumps(history, indent=1, sort_keys=False).encode()
    if fmt == "keras":
        with zipfile.ZipFile(path, "a") as zf:
            if MEMBER in zf.namelist():
                return False
            zf.writestr(zipfile.ZipInfo(MEMBER, (1980, 1, 1, 0, 0, 0)), data)
        return True
    if fmt in ("keras-weights-h5", "legacy-h5"):
        import h5py
        import numpy as np
        with h5py.File(path, "r+") as f:
            if H5_KEY in f:
                del f[H5_KEY]
            f.create_dataset(H5_KEY, data=np.bytes_(data))
        return True
    return False


def embed(writer, fmt: str, history: list) -> bool:
    """Store ``history`` in the output being written; False when the format has no room."""
    data = json.dumps(history, indent=1, sort_keys=False)
    if fmt == "orbax" and hasattr(writer, "set_provenance"):
        writer.set_provenance(data.encode())
        return True
    if fmt == "keras" and hasattr(writer, "set_member"):
        writer.set_member(MEMBER, data.encode())
        return True
    if hasattr(writer, "add_extra"):
        import numpy as np
        writer.add_extra(H5_KEY, np.bytes_(data.encode()))
        return True
    return False


def check_readable(path):
    try:
        return read_log(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise SurgeonError(f"{path}: cannot read surgery log: {exc}") from None
