"""Load a user's data function (``module:function``) and position the stream.

The function returns a ``tf.data.Dataset`` of batches (``(x, y)`` or ``(x, y,
sample_weight)``) or numpy arrays ``(x, y)`` which are batched here. The stream repeats
and skips the batches the checkpoint's iteration counter says were already consumed, so
an interrupted run sees exactly the batches an uninterrupted one would have seen.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from surgeon.core import usermod
from surgeon.core.tf import import_tf
from surgeon.core.errors import SurgeonError


def check_spec(spec: str, what: str = "--data"):
    """(module part, function name, path or None) of ``spec``; no import (cheap)."""
    if ":" not in spec:
        raise SurgeonError(f"{spec}: {what} expects MODULE:FUNCTION (module may be a .py path)")
    mod_part, func_name = spec.rsplit(":", 1)
    if not usermod.is_path(mod_part):
        return mod_part, func_name, None
    path = Path(mod_part)
    if not path.exists():
        raise SurgeonError(f"{spec}: {what}: no such file {path}")
    return mod_part, func_name, path


def load_callable(spec: str, what: str = "--data"):
    """``pkg.module:function`` or ``path/to/file.py:function`` -> the function."""
    mod_part, func_name, _ = check_spec(spec, what)
    module = usermod.import_module(mod_part, what, spec)
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise SurgeonError(f"{spec}: {what}: {mod_part} has no function {func_name!r}")
    return fn


def call_data_fn(fn, seed=None):
    """Call a data function, passing ``seed=`` when it accepts one."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "seed" in params:
        return fn(seed=seed)
    return fn()


def as_dataset(data, batch_size=None):
    """A batched ``tf.data.Dataset`` from a dataset or numpy ``(x, y[, w])``."""
    tf = import_tf()
    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        if not batch_size:
            raise SurgeonError("data function returned arrays: pass batch_size (--batch-size)")
        return tf.data.Dataset.from_tensor_slices(tuple(data)).batch(batch_size)
    raise SurgeonError(f"data function returned {type(data).__name__}; expected a "
                       "tf.data.Dataset or a tuple of numpy arrays (x, y)")


def positioned(ds, consumed: int):
    """Repeat forever, skipping the ``consumed`` batches already trained on."""
    ds = ds.repeat()
    if consumed:
        ds = ds.skip(consumed)
    return ds
