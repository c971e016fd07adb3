"""formats: every on-disk checkpoint format, one module (reader and writer side by side) per
format behind the same small protocol, mapping native keys to canonical names and back;
this ``__init__`` detects a file's format in one place and holds the registry
(``open_checkpoint``, ``open_writer``). Speaks numpy; TensorFlow only inside the TF modules,
imported lazily. May import core and binding; nothing above (no recipe, ops or inspect).
"""
from __future__ import annotations

from pathlib import Path

from surgeon.core.errors import FormatError, SurgeonError

SUPPORTED = (".keras (Keras 3 model), .weights.h5 (Keras 3 weights), "
             ".weights.json (Keras 3 sharded weights), .h5/.hdf5 (legacy Keras 2/tf.keras), "
             "TF checkpoints (prefix, directory or .index), SavedModel directories")

# format name -> (module in surgeon.formats, opener function, writer factory)
# Each module: opener(path, model=None) -> reader; writer(target, like) -> writer.
REGISTRY = {
    "keras": ("keras_zip", "open_keras", "KerasZipWriter"),
    "keras-weights-h5": ("keras_h5", "open_weights_h5", None),
    "keras-weights-sharded": ("keras_h5", "open_sharded", "ShardedWriter"),
    "legacy-h5": ("legacy_h5", "open_legacy_h5", "LegacyH5Writer"),
    "tf-checkpoint": ("tf_bundle", "open_bundle", "BundleWriter"),
    "saved-model": ("tf_bundle", "open_saved_model", "BundleWriter"),
}
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except IsADirectoryError:
        return b""
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror}") from None


def _h5_kind(path: Path) -> str:
    import h5py
    try:
        with h5py.File(path, "r") as f:
            if "model_weights" in f or any(k.startswith("layer_names") for k in f.attrs):
                return "legacy-h5"
    except (OSError, RuntimeError, ValueError, KeyError, TypeError):
        pass  # the reader reports the damage with its own message
    return "keras-weights-h5"


def detect(path) -> str:
    """The format name of ``path`` (a key of ``REGISTRY``)."""
    path = Path(path)
    if not path.exists():
        if Path(str(path) + ".index").exists():
            return "tf-checkpoint"
        raise FormatError(f"{path}: no such file")
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return "saved-model"
        if (path / "checkpoint").exists() or any(path.glob("*.index")):
            return "tf-checkpoint"
        raise FormatError(f"{path}: directory holds no checkpoint; supported: {SUPPORTED}")
    name = path.name.lower()
    if name.endswith(".weights.json"):
        return "keras-weights-sharded"
    if name.endswith(".index"):
        return "tf-checkpoint"
    magic = _magic(path)
    if magic.startswith(ZIP_MAGIC):
        return "keras"
    if magic.startswith(HDF5_MAGIC):
        return _h5_kind(path)
    if name.endswith(".keras"):
        raise FormatError(f"{path}: not a valid .keras archive (no zip signature; truncated or corrupt)")
    if name.endswith((".h5", ".hdf5")):
        raise FormatError(f"{path}: not a valid HDF5 file (no HDF5 signature; truncated or corrupt)")
    raise FormatError(f"{path}: unknown checkpoint format; supported: {SUPPORTED}")


def _module(fmt):
    import importlib
    mod, opener, writer = REGISTRY[fmt]
    try:
        return importlib.import_module(f"surgeon.formats.{mod}"), opener, writer
    except ModuleNotFoundError as exc:
        if exc.name != f"surgeon.formats.{mod}":
            raise
        raise SurgeonError(f"format {fmt!r} is not supported by this version of surgeon") from None


def open_checkpoint(path, model=None):
    """Open any supported checkpoint as a reader (a context manager).

    Args:
        path: checkpoint file, directory or TF prefix.
        model: for bare weights files, a ``.keras`` file or ``config.json`` giving the
            model structure (layer classes, frozen flags, optimizer) used to bind slots.
    Returns:
        A reader with ``entries()``, ``entry(name)``, ``read(name)``, ``metadata()``,
        ``close()``; ``format`` names its format.
    Example:
        >>> with open_checkpoint("fixtures/cnn_adam.keras") as ck:
        ...     [e.name for e in ck.entries()][:2]
        ['conv1/kernel', 'conv1/bias']
    """
    fmt = detect(path)
    module, opener, _ = _module(fmt)
    return getattr(module, opener)(path, model=model)


def open_writer(target, like):
    """A writer producing ``target`` in the same format as reader ``like``, losslessly:
    every tensor not written is copied as stored. Use as a context manager and call
    ``finalize()``; on error nothing appears at ``target``."""
    target = Path(target)
    if not target.parent.exists():
        raise SurgeonError(f"{target}: output directory {target.parent} does not exist")
    if target.exists() and target.resolve() == Path(like.path).resolve():
        raise SurgeonError(f"{target}: output is the input; choose another output path")
    module, _, writer = _module(like.format)
    if writer is None:
        from .keras_h5 import KerasH5Writer
        return KerasH5Writer(like, [target])
    if like.format == "keras-weights-sharded":
        from .keras_sharded import ShardedWriter
        return ShardedWriter(like, target)
    return getattr(module, writer)(like, target)
