"""Orbax checkpoint directories on disk: where the step, the PyTree item and its arrays are.

Layouts handled (checked against orbax-checkpoint 0.12 and Keras 3.15 ``OrbaxCheckpoint``):

* a **root** holding numbered step directories (``CheckpointManager``, Keras'
  ``OrbaxCheckpoint``); the latest committed step unless ``step`` is given;
* a **step directory** with ``_CHECKPOINT_METADATA`` and one subdirectory per item:
  ``pytree`` (+ ``model_config``, ``assets``) for Keras, ``default`` or any named item for
  ``CheckpointManager``;
* an **item directory** with ``_METADATA`` (``StandardCheckpointer``/``PyTreeCheckpointer``);
* arrays in one OCDBT database (``manifest.ocdbt``, ``d/``, ``ocdbt.process_N/`` per
  writing process) or one zarr/zarr3 directory per array (``use_ocdbt=False``).

Only the standard library here; TensorStore is imported by ``orbax`` (the array I/O).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from surgeon.core.errors import FormatError, SurgeonError
from .orbax_kv import COMMIT, KvPath, is_url

INSTALL = "pip install 'surgeon[orbax]'"
STEP_META = "_CHECKPOINT_METADATA"
ITEM_META = "_METADATA"
KERAS_ITEM = "pytree"
PROVENANCE = "surgeon_provenance.json"  # surgery log in a step (or item) directory


def require_tensorstore():
    """The ``tensorstore`` module, or one line saying which extra to install."""
    try:
        import tensorstore
    except ImportError:
        raise SurgeonError(f"reading or writing Orbax checkpoints needs TensorStore: {INSTALL}") from None
    return tensorstore


def location(path):
    """``path`` as a local ``Path``, or a ``KvPath`` for a kvstore URL or spec (gs://, s3://,
    file://, memory://): both answer ``/``, ``exists``, ``is_dir``, ``iterdir``, ``read_bytes``."""
    if isinstance(path, (Path, KvPath)):
        return path
    return KvPath(path) if is_url(path) else Path(path)


def _steps(root) -> list:
    try:
        names = [c.name for c in root.iterdir()]
    except OSError as exc:
        raise FormatError(f"{root}: cannot list: {exc.strerror or exc}") from None
    return sorted(int(n) for n in names if n.isdigit() and (root / n).is_dir())


def _committed(root, steps) -> list:
    """On a kvstore, the steps Orbax finished (``commit_success.txt``, written last)."""
    if not isinstance(root, KvPath):
        return steps
    return [s for s in steps if (root / str(s) / COMMIT).is_file()]


def check_committed(ckpt) -> None:
    """A checkpoint directory on a kvstore must carry Orbax's commit marker."""
    if isinstance(ckpt, KvPath) and not (ckpt / COMMIT).is_file():
        raise FormatError(f"{ckpt}: incomplete Orbax checkpoint: no {COMMIT} (on object stores "
                          "Orbax and surgeon write it last; the write did not finish)")


def is_orbax(path: Path) -> bool:
    """Whether directory ``path`` looks like an Orbax root, step or item directory."""
    if (path / STEP_META).exists() or (path / ITEM_META).exists() or _looks_like_step(path):
        return True
    return any((path / str(s) / STEP_META).exists() or (path / str(s) / KERAS_ITEM).is_dir()
               for s in _steps(path))


def _looks_like_step(path: Path) -> bool:
    """A step directory's items without the step's own metadata."""
    return (path / KERAS_ITEM).is_dir() or any(
        (c / ITEM_META).exists() for c in path.iterdir() if c.is_dir())


_SELECTED: dict = {}  # root (absolute) -> step chosen by --step for this command


def _root_key(path) -> str:
    return str(path).rstrip("/") if is_url(path) else os.path.abspath(str(path).rstrip("/"))


def is_root(path) -> bool:
    """Whether ``path`` is a root of numbered Orbax step directories (not a step itself)."""
    path = location(path)
    return (path.is_dir() and not (path / STEP_META).exists() and not (path / ITEM_META).exists()
            and bool(_steps(path)) and is_orbax(path))


@contextmanager
def select_step(paths, step):
    """While open, Orbax roots among ``paths`` are read at ``step`` (``--step``) instead of
    their latest step, wherever they are opened (inputs, sources, the surgery log)."""
    if step is None:
        yield
        return
    roots = [p for p in paths if p is not None and is_root(p)]
    if not roots:
        raise SurgeonError(f"--step {step}: no input is an Orbax root of numbered steps "
                           "(name a step directory, or drop --step)")
    keys = [_root_key(p) for p in roots]
    saved = dict(_SELECTED)
    _SELECTED.update({k: step for k in keys})
    try:
        yield
    finally:
        _SELECTED.clear()
        _SELECTED.update(saved)


@dataclass(frozen=True)
class Located:
    """Where a checkpoint's PyTree lives."""

    root: Path | None  # the directory of numbered steps, when the input was one
    step_dir: Path | None  # the step directory (None for a bare item directory)
    item: Path  # the PyTree item directory (holds _METADATA)
    step: int | None


def locate(path, step=None) -> Located:
    """Resolve ``path`` (root, step or item directory) to its PyTree item."""
    try:
        return _locate(path, step)
    except OSError as exc:  # a kvstore that cannot be reached (no credentials, no network)
        if not is_url(path) and not isinstance(path, KvPath):
            raise
        raise FormatError(str(exc)) from None


def _locate(path, step=None) -> Located:
    label, path = str(path), location(path)
    if not (path / STEP_META).exists() and not (path / ITEM_META).exists():
        steps = _steps(path)
        if step is None:
            step = _SELECTED.get(_root_key(label))
        if not steps and _looks_like_step(path):
            raise FormatError(f"{path}: Orbax step directory without its {STEP_META} "
                              "(incomplete or damaged checkpoint)")
        if not steps:
            raise FormatError(f"{path}: not an Orbax checkpoint (no {STEP_META}, no {ITEM_META}, "
                              "no numbered step directories)")
        if step is None:
            done = _committed(path, steps)
            if not done:
                check_committed(path / str(steps[-1]))
            step = done[-1]
        elif step not in steps:
            raise FormatError(f"{path}: no step {step}; steps: {', '.join(map(str, steps))}")
        found = _locate(path / str(step))
        return Located(path, found.step_dir, found.item, step)
    if step is not None:
        raise SurgeonError(f"{path}: --step is for a root of numbered steps; this is one checkpoint")
    check_committed(path)
    if (path / ITEM_META).exists() and not (path / STEP_META).exists():
        return Located(None, None, path, None)
    return Located(None, path, _item_of(path), int(path.name) if path.name.isdigit() else None)


def _item_of(step_dir: Path) -> Path:
    """The PyTree item of a step directory: ``pytree`` (Keras), else the one item holding
    arrays, else the step directory itself (a ``StandardCheckpointer`` save)."""
    if (step_dir / KERAS_ITEM / ITEM_META).exists():
        return step_dir / KERAS_ITEM
    if (step_dir / KERAS_ITEM).is_dir():
        raise FormatError(f"{step_dir / KERAS_ITEM}: PyTree item without its {ITEM_META} "
                          "(incomplete or damaged checkpoint)")
    items = [c for c in sorted(step_dir.iterdir(), key=lambda c: c.name)
             if (c / ITEM_META).exists() and not c.name.startswith(".")]
    arrays = [i for i in items if _has_arrays(i)]
    if (step_dir / ITEM_META).exists():
        return step_dir
    if len(arrays) == 1:
        return arrays[0]
    if not arrays:
        raise FormatError(f"{step_dir}: Orbax step directory without PyTree metadata "
                          f"({ITEM_META}); incomplete or damaged checkpoint")
    names = ", ".join(i.name for i in arrays)
    raise FormatError(f"{step_dir}: several PyTree items ({names}); give the item directory")


def _has_arrays(item: Path) -> bool:
    return (item / "manifest.ocdbt").exists() or any(
        p.is_dir() and p.name != "d" and not p.name.startswith("ocdbt.process_") for p in item.iterdir())


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FormatError(f"{path}: missing {what}") from None
    except OSError as exc:
        if isinstance(path, KvPath):  # the store could not be read: not damage
            raise FormatError(str(exc)) from None
        raise FormatError(f"{path}: damaged {what}: {exc}") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: damaged {what}: {exc}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: damaged {what}: not a JSON object")
    return data


@dataclass(frozen=True)
class Leaf:
    """One leaf of the saved PyTree."""

    keys: tuple  # the tree path, e.g. ('trainable_variables', 'seq', 'd1', 'kernel')
    value_type: str  # 'np.ndarray', 'jax.Array', 'scalar', 'string', ...

    @property
    def key(self) -> str:
        """The TensorStore path Orbax stores the array under (keys joined by dots)."""
        return ".".join(str(k) for k in self.keys)


def tree_metadata(item: Path):
    """(leaves, flags) from an item's ``_METADATA``: flags hold use_ocdbt, use_zarr3."""
    meta = read_json(item / ITEM_META, "Orbax PyTree metadata (_METADATA)")
    tree = meta.get("tree_metadata")
    if not isinstance(tree, dict):
        raise FormatError(f"{item / ITEM_META}: damaged Orbax PyTree metadata (no tree_metadata)")
    leaves = []
    for raw, leaf in tree.items():
        try:
            keys = tuple(k["key"] for k in leaf["key_metadata"])
            vtype = leaf["value_metadata"]["value_type"]
            empty = leaf["value_metadata"].get("skip_deserialize", False)
        except (KeyError, TypeError):
            raise FormatError(f"{item / ITEM_META}: damaged entry {raw!r}") from None
        if not empty:  # an empty container ({} non_trainable_variables) stores nothing
            leaves.append(Leaf(keys, vtype))
    return leaves, meta


def kvspec(folder, key=None) -> dict:
    """The TensorStore kvstore spec of ``folder`` (a local directory or a ``KvPath``), or of
    ``key`` inside it."""
    if isinstance(folder, KvPath):
        return folder.spec(key)
    return {"driver": "file", "path": f"{Path(folder).resolve()}/" + (f"{key}/" if key else "")}


def kv_context():
    from .orbax_kv import context
    return context()


def check_ocdbt(item: Path, ts) -> None:
    """A damaged OCDBT database fails here, at open, with one line: a missing or truncated
    manifest, or a data file it references (``ocdbt.process_N/d/...``) that is absent."""
    manifest = item / "manifest.ocdbt"
    if not manifest.exists():
        raise FormatError(f"{item}: OCDBT checkpoint without manifest.ocdbt (incomplete or damaged)")
    try:
        kv = ts.KvStore.open(kvspec(item), context=kv_context()).result()
        dump = ts.ocdbt.dump(kv).result()
        files = set()
        for version in dump.get("versions", []):
            _referenced(ts, kv, version["root"].get("location", ""), files)
    except Exception as exc:  # TensorStore: ValueError with a status text
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise FormatError(f"{manifest}: damaged OCDBT manifest: {lines[0][:300]}") from None
    for rel in sorted(files):
        if not (item / rel).is_file():
            proc = rel.split("/", 1)[0] if rel.startswith("ocdbt.process_") else None
            what = f"{proc}/ is missing" if proc and not (item / proc).is_dir() else f"{rel} is missing"
            raise FormatError(f"{item}: incomplete OCDBT checkpoint: {what} (a writing "
                              "process' data; copy the whole checkpoint directory)")


def _location_file(loc: str):
    """The data file of an OCDBT location ``btreenode::d/x:0:9`` / ``value:ocdbt.process_0/:d/x:0:9``."""
    body = loc.split(":", 1)[1].lstrip(":") if ":" in loc else loc
    parts = body.rsplit(":", 2)[0].split(":")
    return "".join(parts)


def _referenced(ts, kv, location, files, depth=0):
    if not location or depth > 64:
        return
    files.add(_location_file(location))
    node = ts.ocdbt.dump(kv, location).result()
    for e in node.get("entries", []):
        if "indirect_value" in e:
            files.add(_location_file(e["indirect_value"]))
        for key in ("location", "node"):
            if isinstance(e.get(key), str) and e[key].startswith("btreenode"):
                _referenced(ts, kv, e[key], files, depth + 1)
