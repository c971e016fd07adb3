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
             "TF checkpoints (prefix, directory or .index), SavedModel directories, "
             "Orbax checkpoint directories (root, step or item)")

# format name -> (module in surgeon.formats, opener function, writer factory)
# Each module: opener(path, model=None) -> reader; writer(target, like) -> writer.
REGISTRY = {
    "keras": ("keras_zip", "open_keras", "KerasZipWriter"),
    "keras-weights-h5": ("keras_h5", "open_weights_h5", None),
    "keras-weights-sharded": ("keras_h5", "open_sharded", "ShardedWriter"),
    "legacy-h5": ("legacy_h5", "open_legacy_h5", "LegacyH5Writer"),
    "tf-checkpoint": ("tf_bundle", "open_bundle", "BundleWriter"),
    "saved-model": ("tf_bundle", "open_saved_model", "BundleWriter"),
    "orbax": ("orbax", "open_orbax", "OrbaxWriter"),
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


def is_url(path) -> bool:
    """Whether ``path`` is a TensorStore kvstore URL (``gs://``, ``s3://``, ``file://``,
    ``memory://``) or spec (a dict): Orbax checkpoints only, read and written by TensorStore."""
    return isinstance(path, dict) or "://" in str(path)


def detect(path) -> str:
    """The format name of ``path`` (a key of ``REGISTRY``)."""
    if is_url(path):
        return "orbax"  # the one format read through TensorStore (its reader checks the layout)
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
        from .orbax_layout import is_orbax
        if is_orbax(path):
            return "orbax"
        raise FormatError(f"{path}: directory holds no checkpoint; supported: {SUPPORTED}")
    name = path.name.lower()
    if name.endswith(".weights.json"):
        return "keras-weights-sharded"
    if name.endswith(".index"):
        return "tf-checkpoint"
    from surgeon.core import journal
    journal.recover(path)  # an in-place edit interrupted by a crash is rolled back first
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


def select_step(paths, step):
    """Context manager: Orbax roots among ``paths`` are opened at ``step`` (``--step N``)
    instead of their latest step; refuses when none of ``paths`` is such a root."""
    from .orbax_layout import select_step as select
    return select(paths, step)


STEP_HELP = "For Orbax roots of numbered steps among the inputs: the step to read (default: the latest)."


def _module(fmt):
    import importlib
    mod, opener, writer = REGISTRY[fmt]
    try:
        return importlib.import_module(f"surgeon.formats.{mod}"), opener, writer
    except ModuleNotFoundError as exc:
        if exc.name != f"surgeon.formats.{mod}":
            raise
        raise SurgeonError(f"format {fmt!r} is not supported by this version of surgeon") from None


def open_checkpoint(path, model=None, step=None):
    """Open any supported checkpoint as a reader (a context manager).

    Args:
        path: checkpoint file, directory or TF prefix.
        model: for bare weights files, a ``.keras`` file or ``config.json`` giving the
            model structure (layer classes, frozen flags, optimizer) used to bind slots.
        step: for an Orbax root of numbered steps, the step to open (default: the latest).
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
    from surgeon.core import atomic
    inputs = [path] + ([model] if model is not None else [])
    tokens = [atomic.protect(p) for p in inputs if not is_url(p)]  # no write may touch it while it is open
    try:
        extra = {"step": step} if step is not None else {}
        if step is not None and fmt != "orbax":
            raise SurgeonError(f"{path}: --step is for Orbax checkpoint roots")
        reader = getattr(module, opener)(path, model=model, **extra)
    except BaseException:
        for t in tokens:
            atomic.release(t)
        raise
    _release_on_close(reader, tokens)
    return reader


def _release_on_close(reader, tokens):
    """Unregister the reader's inputs when it is closed (or garbage-collected)."""
    import weakref

    from surgeon.core import atomic
    close = reader.close

    def closing():
        try:
            close()
        finally:
            for t in tokens:
                atomic.release(t)
    reader.close = closing
    weakref.finalize(reader, lambda: [atomic.release(t) for t in tokens])


# The format an output's name announces; a writer never produces anything else.
_NAMED = ((".weights.json", "keras-weights-sharded"), (".weights.h5", "keras-weights-h5"),
          (".keras", "keras"), (".h5", "legacy-h5"), (".hdf5", "legacy-h5"),
          (".ckpt", "tf"), (".index", "tf"))
_FAMILY = {"tf-checkpoint": "tf", "saved-model": "tf"}
_SAY = {"keras-weights-sharded": "a Keras sharded weights index (.weights.json)",
        "keras-weights-h5": "Keras 3 weights (.weights.h5)", "keras": "a Keras model (.keras)",
        "legacy-h5": "a legacy Keras H5 (.h5)", "tf": "a TF checkpoint (prefix or directory)"}


def name_format(path) -> str | None:
    """The format ``path``'s name announces (``tf`` for TF prefixes), None when it says none."""
    name = Path(str(path).rstrip("/")).name.lower()
    return next((fmt for ext, fmt in _NAMED if name.endswith(ext)), None)


def check_output_name(target, fmt, like_path=None, what=None) -> None:
    """Refuse to write ``fmt`` content under a name announcing another format.

    An output named like its input (``like_path``) is accepted (the same convention)."""
    said, family = name_format(target), _FAMILY.get(fmt, fmt)
    if said is None or said == family:
        return
    if like_path is not None and name_format(like_path) == said:
        return
    what = what or f"this command writes the input's format, {_SAY.get(family, family)}"
    ext = {"tf": "TF checkpoint"}.get(family) or next((e for e, f in _NAMED if f == family), family)
    raise SurgeonError(f"{target}: the name says {_SAY[said]} but {what}; write a {ext}, "
                       f"then `surgeon convert` it to {Path(str(target)).name}")


def open_writer(target, like):
    """A writer producing ``target`` in the same format as reader ``like``, losslessly:
    every tensor not written is copied as stored. Use as a context manager and call
    ``finalize()``; on error nothing appears at ``target``."""
    from surgeon.core import atomic
    if is_url(target):
        if like.format != "orbax":
            raise SurgeonError(f"{target}: only Orbax checkpoints are written to a kvstore URL; "
                               f"this input is {like.format}: write a local file")
        return _module("orbax")[0].OrbaxWriter(like, target)
    target = Path(target)
    if not target.parent.exists():
        raise SurgeonError(f"{target}: output directory {target.parent} does not exist")
    atomic.check_output(target, [] if is_url(like.path) else [like.path])
    check_output_name(target, like.format, like.path)
    module, _, writer = _module(like.format)
    if writer is None:
        from .keras_h5 import KerasH5Writer
        return KerasH5Writer(like, [target])
    if like.format == "keras-weights-sharded":
        from .keras_sharded import ShardedWriter
        return ShardedWriter(like, target)
    return getattr(module, writer)(like, target)
