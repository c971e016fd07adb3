"""``mask``: magnitude pruning to a sparsity, with a persistent mask stored in the checkpoint.

The ``sparsity`` fraction of each selected tensor's smallest-magnitude elements is set
to zero. The mask (True = kept) is stored beside the weights, as the extra H5 dataset
``surgeon/masks/<canonical name>`` (Keras ignores it when loading), and is combined with
any mask already present, so pruning twice never revives a weight. ``read_masks(path)``
gives the masks back (the resume loop uses it to keep pruned weights at zero).
Slot policies: keep | reset | warm (for the pruned elements). Default ``reset``.
"""
from __future__ import annotations

import numpy as np

from surgeon.core.errors import RecipeError
from .base import Op, Result, check_number, float_value, like

MASK_ROOT = "surgeon/masks"
MASK_FORMATS = ("keras", "keras-weights-h5", "keras-weights-sharded")


def mask_key(name: str) -> str:
    return f"{MASK_ROOT}/{name}"


class Mask(Op):
    name = "mask"
    summary = "magnitude pruning to a sparsity; the mask is stored in the checkpoint"
    params = {"sparsity": 0.5}
    slot_policies = ("keep", "reset", "warm")
    default_slots = "reset"

    def check(self, spec):
        check_number(spec, "sparsity", lo=0, hi=1)

    def plan(self, spec, ctx):
        if ctx.reader.format not in MASK_FORMATS:
            raise RecipeError(f"{spec.where}: op 'mask': format {ctx.reader.format!r} has no room "
                              f"for a mask; supported: {', '.join(MASK_FORMATS)}")
        return super().plan(spec, ctx)

    def apply(self, step, value, ctx):
        v = float_value(value)
        keep = magnitude_mask(v, float(step.info("sparsity")))
        old = ctx.existing_mask(step.target)
        if old is not None:
            keep &= old.astype(bool)
        return Result(like(np.where(keep, v, 0.0), value), touched=~keep,
                      extras={mask_key(step.target): keep})


def magnitude_mask(v: np.ndarray, sparsity: float) -> np.ndarray:
    """True for the elements kept: all but the ``round(sparsity * n)`` smallest |v|."""
    n = v.size
    k = int(round(sparsity * n))
    keep = np.ones(v.shape, bool)
    if k <= 0:
        return keep
    order = np.argsort(np.abs(v).ravel(), kind="stable")
    keep.ravel()[order[:k]] = False
    return keep


def read_masks(source) -> dict:
    """The pruning masks stored in a checkpoint: canonical name -> bool array (True = kept).

    ``source`` is a path or an open reader. Returns {} when the file has no masks.

    Example:
        >>> read_masks("out/prune_magnitude.keras")["conv2/kernel"].mean()
        0.5
    """
    from surgeon.formats import open_checkpoint
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        with open_checkpoint(source) as reader:
            return read_masks(reader)
    structure = getattr(source, "structure", None)
    node = structure().get(MASK_ROOT) if structure else None
    out = {}

    def visit(n, prefix):
        for key, item in n.items.items():
            if hasattr(item, "items"):
                visit(item, f"{prefix}{key}/")
            else:
                out[f"{prefix}{key}"] = source.read_key(item.path).astype(bool)

    if node is not None:
        visit(node, "")
    return out
