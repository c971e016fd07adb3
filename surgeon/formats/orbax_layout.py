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
from dataclasses import dataclass
from pathlib import Path

from surgeon.core.errors import FormatError, SurgeonError

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


def _steps(root: Path) -> list:
    try:
        names = os.listdir(root)
    except OSError as exc:
        raise FormatError(f"{root}: cannot list: {exc.strerror}") from None
    return sorted(int(n) for n in names if n.isdigit() and (root / n).is_dir())


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


@dataclass(frozen=True)
class Located:
    """Where a checkpoint's PyTree lives."""

    root: Path | None  # the directory of numbered steps, when the input was one
    step_dir: Path | None  # the step directory (None for a bare item directory)
    item: Path  # the PyTree item directory (holds _METADATA)
    step: int | None


def locate(path, step=None) -> Located:
    """Resolve ``path`` (root, step or item directory) to its PyTree item."""
    path = Path(path)
    if not (path / STEP_META).exists() and not (path / ITEM_META).exists():
        steps = _steps(path)
        if not steps and _looks_like_step(path):
            raise FormatError(f"{path}: Orbax step directory without its {STEP_META} "
                              "(incomplete or damaged checkpoint)")
        if not steps:
            raise FormatError(f"{path}: not an Orbax checkpoint (no {STEP_META}, no {ITEM_META}, "
                              "no numbered step directories)")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FormatError(f"{path}: no step {step}; steps: {', '.join(map(str, steps))}")
        found = locate(path / str(step))
        return Located(path, found.step_dir, found.item, step)
    if step is not None:
        raise SurgeonError(f"{path}: --step is for a root of numbered steps; this is one checkpoint")
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
    items = [step_dir / n for n in sorted(os.listdir(step_dir))
             if (step_dir / n / ITEM_META).exists() and not n.startswith(".")]
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
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        raise FormatError(f"{path}: missing {what}") from None
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


def check_ocdbt(item: Path, ts) -> None:
    """A damaged OCDBT database fails here, at open, with one line: a missing or truncated
    manifest, or a data file it references (``ocdbt.process_N/d/...``) that is absent."""
    manifest = item / "manifest.ocdbt"
    if not manifest.exists():
        raise FormatError(f"{item}: OCDBT checkpoint without manifest.ocdbt (incomplete or damaged)")
    try:
        kv = ts.KvStore.open({"driver": "file", "path": f"{item.resolve()}/"}).result()
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
