"""Format detection and the reader/writer registry (one module per on-disk format)."""
from __future__ import annotations

from pathlib import Path

from ..errors import FormatError, SurgeonError

SUPPORTED = (".keras (Keras 3 model), .weights.h5 (Keras 3 weights), "
             ".weights.json (Keras 3 sharded weights)")
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


def detect(path) -> str:
    """The format name of ``path``: keras, keras-weights-h5, keras-weights-sharded."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    name = path.name.lower()
    if name.endswith(".weights.json"):
        return "keras-weights-sharded"
    magic = _magic(path)
    if magic.startswith(ZIP_MAGIC) or (name.endswith(".keras") and not magic.startswith(HDF5_MAGIC)):
        return "keras"
    if magic.startswith(HDF5_MAGIC) or name.endswith(".h5") or name.endswith(".hdf5"):
        return "keras-weights-h5"
    raise FormatError(f"{path}: unknown checkpoint format; supported: {SUPPORTED}")


def open_checkpoint(path, model=None):
    """Open any supported checkpoint as a reader (a context manager).

    Args:
        path: checkpoint file.
        model: for bare weights files, a ``.keras`` file or ``config.json`` giving the
            model structure (layer classes, frozen flags, optimizer) used to bind slots.
    Returns:
        A reader with ``entries()``, ``read(name)``, ``metadata()``, ``close()``.
    Example:
        >>> with open_checkpoint("fixtures/cnn_adam.keras") as ck:
        ...     [e.name for e in ck.entries()][:2]
        ['conv1/kernel', 'conv1/bias']
    """
    fmt = detect(path)
    if fmt == "keras":
        from .keras_zip import KerasZipReader
        if model is not None:
            raise SurgeonError("--model is only for bare weights files; a .keras file has its own config")
        return KerasZipReader(path)
    if fmt == "keras-weights-sharded":
        from .keras_h5 import open_sharded
        return open_sharded(path, model)
    from .keras_h5 import open_weights_h5
    return open_weights_h5(path, model)


def open_writer(target, like):
    """A writer producing ``target`` in the same format as reader ``like``, lossless."""
    target = Path(target)
    if not target.parent.exists():
        raise SurgeonError(f"{target}: output directory {target.parent} does not exist")
    if target.exists() and target.resolve() == Path(like.path).resolve():
        raise SurgeonError(f"{target}: output is the input; choose another output path")
    if like.format == "keras":
        from .keras_zip import KerasZipWriter
        return KerasZipWriter(like, target)
    if like.format == "keras-weights-sharded":
        from .keras_sharded import ShardedWriter
        return ShardedWriter(like, target)
    from .keras_h5 import KerasH5Writer
    return KerasH5Writer(like, [target])
