"""Persistent pruning masks: read them from a checkpoint, honour them while training.

The recipe engine's ``mask`` op stores masks in the checkpoint. The resume loop reads
them with ``read_masks(reader)``: it uses ``surgeon.ops.mask.read_masks`` when the
recipe engine provides it, otherwise it looks for tensors named ``surgeon/masks/<param>``
(the agreed convention). A masked weight stays exactly zero through training: its
gradient is masked before ``apply_gradients`` (so Adam/RMSprop moments of pruned
elements stay zero) and the weight and its slots are projected after each update
(``tf.where``, so pruned elements are +0.0, never -0.0).
"""
from __future__ import annotations

import numpy as np

from surgeon.core.tf import import_tf

PREFIX = "surgeon/masks/"


def read_masks(reader) -> dict:
    """{param canonical name: bool array} stored in ``reader`` (empty when none)."""
    try:
        from surgeon.ops import mask as mask_op
    except ImportError:
        mask_op = None
    if mask_op is not None and hasattr(mask_op, "read_masks"):
        return {k: np.asarray(v, dtype=bool) for k, v in mask_op.read_masks(reader).items()}
    out = {}
    for e in reader.entries():
        if e.name.startswith(PREFIX):
            out[e.name[len(PREFIX):]] = np.asarray(reader.read(e.name)) != 0
    return out


class MaskSet:
    """Masks bound to live variables (created under the strategy scope)."""

    def __init__(self, masks: dict, varmap):
        tf = import_tf()
        self.by_index, self.bound = {}, []
        for name, m in masks.items():
            var = varmap.model.get(name)
            if var is None or tuple(var.shape) != m.shape:
                from surgeon.core.errors import SurgeonError
                raise SurgeonError(f"mask for {name!r} does not fit the model "
                                   f"(mask {list(m.shape)}, weight "
                                   f"{list(var.shape) if var is not None else 'absent'})")
            keep = tf.Variable(m, trainable=False, dtype=tf.bool, name=f"mask_{len(self.bound)}")
            self.bound.append((var, keep, list(varmap.slots.get(name, {}).values())))
            if name in varmap.trainable:
                self.by_index[varmap.trainable.index(name)] = keep

    def __bool__(self):
        return bool(self.bound)

    def mask_grads(self, grads):
        """Zero the gradients of pruned elements (replica context)."""
        tf = import_tf()
        out = list(grads)
        for i, keep in self.by_index.items():
            if out[i] is not None:
                out[i] = tf.where(keep, out[i], tf.zeros_like(out[i]))
        return out

    def project(self):
        """Pruned weights and their slots to exactly zero (cross-replica context)."""
        tf = import_tf()
        for var, keep, slots in self.bound:
            for v in [var] + slots:
                val = v.value if hasattr(v, "value") else v
                v.assign(tf.where(keep, val, tf.zeros_like(val)))
