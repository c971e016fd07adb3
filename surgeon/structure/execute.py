"""Write a planned structural edit: Keras builds a skeleton of the new model, surgeon fills it.

1. The edited config is deserialised by Keras (``safe_mode``: no code from configs),
   compiled with the source's compile config, the optimizer built, and saved to a
   temporary ``.keras`` beside the output. Its ``config.json`` is Keras' own
   serialisation of the new model, so the output loads without warnings.
2. Every tensor of the skeleton is then written from the source checkpoint with the
   lossless writer: untouched weights and slots copied by canonical name
   (bit-identical), touched ones transformed as planned, new ones initialised
   (identity / zeros / Keras' initialiser) with zero slots; iteration and learning
   rate copied. Shapes are all checked before anything is written.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from surgeon.core.tf import import_keras_light
from surgeon.core.errors import SurgeonError
from surgeon.formats import open_checkpoint, open_writer
from .plan import apply_steps, identity_init


def _build_skeleton(plan, with_optimizer, path):
    keras = import_keras_light()
    cfg = json.loads(json.dumps(plan.config))
    cfg["compile_config"] = plan.compile_config if with_optimizer else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = keras.saving.deserialize_keras_object(cfg, safe_mode=True)
            if with_optimizer and getattr(model, "optimizer", None) is not None:
                model.optimizer.build(model.trainable_variables)
            model.save(path)
    except Exception as exc:  # Keras raises many kinds; all mean "this graph does not build"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeonError(f"{plan.source_path}: the edited model does not build in Keras "
                           f"({plan.op}): {first}") from None


def _decide(plan, src, sk):
    """Per skeleton param/state: (source name or None, steps, init); raises on any misfit."""
    src_names = {e.name: e for e in src.entries()}
    inherit = dict(plan.params.get("_inherit", {}))
    out = {}
    for e in sk.entries():
        if e.role not in ("param", "state"):
            continue
        a = plan.actions.get(e.name)
        if a is not None:
            out[e.name] = (a.source, a.steps, a.init)
            continue
        lname, _, var = e.name.rpartition("/")
        if lname in inherit:
            old = f"{inherit[lname]}/{var}"
            ok = old in src_names and src_names[old].shape == e.shape
            out[e.name] = (old, [], None) if ok else (None, [], "keras")
            continue
        if lname in plan.new_layers:
            out[e.name] = (None, [], "keras")
            continue
        if e.name not in src_names:
            raise SurgeonError(f"{plan.source_path}: internal: tensor {e.name} of the edited "
                               "model has no source")
        if src_names[e.name].shape != e.shape:
            raise SurgeonError(
                f"{plan.source_path}: cannot {plan.op}: layer {e.layer!r} does not fit the edited "
                f"graph ({e.name} is {list(src_names[e.name].shape)}, the new model needs "
                f"{list(e.shape)}); edit its input too or choose another layer")
        out[e.name] = (e.name, [], None)
    return out


def _value(src, sk, name, decision):
    source, steps, init = decision
    e = sk.entry(name)
    if source is None:
        if init == "identity":
            return identity_init(e.shape)
        if init == "zeros":
            return np.zeros(e.shape, dtype=np.float32)
        return None  # keep the skeleton's (Keras-initialised) value
    val = apply_steps(src.read(source), steps)
    if tuple(val.shape) != tuple(e.shape):
        raise SurgeonError(f"{src.path}: internal: {name} planned as {list(val.shape)}, "
                           f"the new model needs {list(e.shape)}")
    return val


def _slot_value(plan, src, sk, e, decision, src_names):
    source, steps, _ = decision
    touched = bool(steps) or source != e.slot_of
    if source is None or (plan.slots == "reset" and touched):
        return np.zeros(e.shape, dtype=np.float32)
    name = f"optimizer/{source}/{e.slot}"
    if name not in src_names:
        return np.zeros(e.shape, dtype=np.float32)
    return apply_steps(src.read(name), steps, slot_kind=e.slot)


def execute(plan, out, log=True) -> dict:
    """Write ``plan`` to ``out`` (a ``.keras`` path). Returns a small summary dict.

    ``log``: embed the surgery log (the source's history, then this edit)."""
    from surgeon.core import atomic
    from surgeon.formats import check_output_name
    out = Path(out)
    atomic.check_output(out, [plan.source_path])
    check_output_name(out, "keras", what=f"{plan.op.replace('_', '-')} writes a Keras model (.keras)")
    if not out.parent.exists():
        raise SurgeonError(f"{out}: output directory {out.parent} does not exist")
    with open_checkpoint(plan.source_path) as src:
        src_names = {e.name: e for e in src.entries()}
        if any(n.startswith("optimizer/unresolved/") for n in src_names):
            raise SurgeonError(f"{plan.source_path}: optimizer state is not fully bound to the "
                               "weights; structural edits need every slot bound")
        with_opt = any(e.role == "slot" or e.role == "optimizer" for e in src_names.values())
        tmpdir = tempfile.mkdtemp(prefix=".surgeon-skeleton-", dir=out.parent)
        try:
            skel = Path(tmpdir) / "skeleton.keras"
            _build_skeleton(plan, with_opt, skel)
            with open_checkpoint(skel) as sk:
                return _fill(plan, src, sk, out, src_names, log)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _fill(plan, src, sk, out, src_names, log=True):
    decisions = _decide(plan, src, sk)
    counts = {"copied": 0, "transformed": 0, "new": 0, "slots": 0}
    with open_writer(out, like=sk) as w:
        for e in sk.entries():
            if e.role in ("param", "state"):
                d = decisions[e.name]
                val = _value(src, sk, e.name, d)
                if val is not None:
                    w.write(e.name, np.asarray(val).astype(_np_dtype(e.dtype), copy=False))
                key = "new" if d[0] is None else ("transformed" if d[1] else "copied")
                counts[key] += 1
            elif e.role == "slot" and e.slot_of in decisions:
                val = _slot_value(plan, src, sk, e, decisions[e.slot_of], src_names)
                w.write(e.name, np.asarray(val).astype(_np_dtype(e.dtype), copy=False))
                counts["slots"] += 1
            elif e.role == "optimizer" and e.name in src_names:
                w.write(e.name, src.read(e.name))
        if log:
            _embed_log(plan, w, counts)
        w.finalize()
    counts["output"] = str(out)
    return counts


def _embed_log(plan, writer, counts):
    from surgeon.formats import provenance
    op = plan.op.replace("_", "-")
    args = {"model": plan.source_path} | {k: v for k, v in plan.params.items()
                                          if not k.startswith("_")} | {"slots": plan.slots}
    structural = [plan.to_json() | {"where": f"surgeon {op}"}]
    rec = provenance.command_record(op, args, {"input": plan.source_path}, dict(counts),
                                    structural=structural)
    provenance.embed(writer, "keras", provenance.chained(plan.source_path, rec))


def _np_dtype(dtype):
    if dtype == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(dtype)
