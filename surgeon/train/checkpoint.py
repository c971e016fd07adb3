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
    from surgeon.core.tree import is_metric
    by_name = {}
    for e in reader.entries():
        if is_metric(e):  # kept as stored (Keras resets them every epoch)
            continue
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


def check_output(checkpoint, output, model=None) -> None:
    """Before any work: the output is not an input, and its name announces a format resume
    writes (the input's; or .keras / .weights.h5, which Keras' saver writes)."""
    from surgeon.formats import check_output_name, detect, name_format
    if output is None:
        return
    model_file = model if isinstance(model, (str, Path)) and Path(str(model)).exists() else None
    if "{iteration}" not in str(output):
        atomic.check_output(output, [checkpoint, model_file])
    if name_format(output) not in ("keras", "keras-weights-h5"):
        check_output_name(output, detect(checkpoint), checkpoint,
                          what=f"resume writes the input's format ({detect(checkpoint)}), or "
                               ".keras / .weights.h5")


def same_format(reader, output) -> bool:
    """True when ``output``'s name announces ``reader``'s format (or names no format)."""
    from surgeon.formats import check_output_name
    try:
        check_output_name(output, reader.format, reader.path)
    except SurgeonError:
        return False
    return True


def history(checkpoint, arguments, summary) -> list:
    """The surgery log of a resume output: the input's history, then this run."""
    from surgeon.formats import provenance
    args = {k: (v if isinstance(v, (str, int, float, bool)) or v is None else type(v).__name__)
            for k, v in arguments.items()}
    rec = provenance.command_record("resume", args, {"input": checkpoint}, summary)
    return provenance.chained(checkpoint, rec)


def write_like(reader, vm, target, log=None) -> Path:
    """Rewrite ``reader``'s checkpoint at ``target`` with the live values (atomic)."""
    from surgeon.formats import provenance
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
            if e.name == "optimizer/iteration" and hasattr(w, "set_step"):
                w.set_step(int(arr))  # an Orbax step directory is named by its step
        if log is not None:
            provenance.embed(w, reader.format, log)
        out = w.finalize()
        return out if "://" in str(out) else Path(out)  # a kvstore URL stays one


def write_keras(model, target, log=None) -> Path:
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
        if log is not None:
            from surgeon.formats import provenance
            provenance.embed_file(tmp, "keras" if suffix == ".keras" else "keras-weights-h5", log)
        atomic.commit(tmp, target)
    except BaseException:
        atomic.discard(tmp)
        raise
    return target


def save(reader, vm, model, target, like: bool, log=None) -> Path:
    """Write the live state to ``target``: surgeon's writer when ``like`` (and the name
    announces the input's format), else Keras' saver; ``log``: the surgery log to embed."""
    if like and same_format(reader, target):
        return write_like(reader, vm, target, log)
    return write_keras(model, target, log)
