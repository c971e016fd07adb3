"""Write the live model and optimizer back through surgeon's lossless writer.

When every live variable has a same-named, same-shaped entry in the source checkpoint,
the output is the source rewritten with live values (``open_writer(out, like=reader)``):
same format, same layout, every other byte copied as stored, atomic. When the model no
longer fits the source's tree (``--allow-missing``, an optimizer of another kind), the
output is written by Keras into a temporary file and renamed into place.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from surgeon.core import atomic
from surgeon.core.errors import SurgeonError
from surgeon.formats import open_writer


def live_values(vm) -> dict:
    return {**vm.model, **vm.optimizer}


def writable_like(reader, vm, optimizer=None) -> bool:
    """True when the source tree and the live variables are the same set of names and
    shapes (and the same optimizer kind), so the source can be rewritten in place."""
    by_name = {}
    for e in reader.entries():
        name = vm.keys.get(e.key, e.name) if e.role in ("param", "state") else e.name
        by_name[name] = tuple(e.shape)
    live = {n: tuple(v.shape) for n, v in live_values(vm).items()}
    if by_name != live:
        return False
    kind = ((reader.metadata() or {}).get("optimizer") or {}).get("class_name")
    return optimizer is None or kind in (None, type(optimizer).__name__)


def _numpy(var):
    v = var.value if hasattr(var, "value") else var
    return v.numpy() if hasattr(v, "numpy") else np.asarray(v)


def write_like(reader, vm, target) -> Path:
    """Rewrite ``reader``'s checkpoint at ``target`` with the live values (atomic)."""
    live = live_values(vm)
    with open_writer(target, like=reader) as w:
        for e in reader.entries():
            name = vm.keys.get(e.key, e.name) if e.role in ("param", "state") else e.name
            var = live.get(name)
            if var is None:
                continue
            arr = _numpy(var)
            if str(arr.dtype) != e.dtype:
                arr = arr.astype(e.dtype)
            w.write(e.name, arr)
        return Path(w.finalize())


def write_keras(model, target) -> Path:
    """Keras' own saver into a temp file beside ``target``, then an atomic rename."""
    target = Path(target)
    name = target.name
    if name.endswith(".weights.h5"):
        suffix, save = ".weights.h5", model.save_weights
    elif name.endswith(".keras"):
        suffix, save = ".keras", model.save
    else:
        raise SurgeonError(f"{target}: the model no longer fits the source checkpoint's "
                           "layout, so the output is written by Keras: name it .keras or "
                           ".weights.h5")
    tmp = atomic.temp_path(target, suffix)
    try:
        atomic.discard(tmp)
        save(str(tmp))
        atomic.commit(tmp, target)
    except BaseException:
        atomic.discard(tmp)
        raise
    return target


def save(reader, vm, model, target, like: bool) -> Path:
    return write_like(reader, vm, target) if like else write_keras(model, target)
