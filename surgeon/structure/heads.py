"""Attention heads: ``delete_heads`` / ``prune_heads`` on a MultiHeadAttention layer.

Head h owns slice h of the query, key and value projections (kernels ``(d, heads, dim)``,
biases ``(heads, dim)``) and rows h of the output projection (``(heads, value_dim, out)``);
deleting heads gathers those slices (weights and slots alike) and lowers ``num_heads``.
The layer's output shape is unchanged, so nothing downstream moves. The result equals the
source model with the deleted heads' output-projection rows zeroed.
"""
from __future__ import annotations

import numpy as np

from surgeon.core.errors import SurgeonError
from surgeon.formats import open_checkpoint
from .ops import _plan, load
from .plan import TensorAction

# variable -> head axis
HEAD_AXES = {"query/kernel": 1, "query/bias": 0, "key/kernel": 1, "key/bias": 0,
             "value/kernel": 1, "value/bias": 0, "attention_output/kernel": 0}


def _mha(g, name, verb):
    layer = g.layer(name)
    if layer.cls != "MultiHeadAttention":
        raise SurgeonError(f"{g.label}: cannot {verb} {name!r}: it is a {layer.cls} layer; "
                           "heads are edited on MultiHeadAttention layers")
    if layer.shared:
        raise SurgeonError(f"{g.label}: cannot {verb} {name!r}: the layer is shared "
                           "(called more than once)")
    if layer.config.get("use_gate"):
        raise SurgeonError(f"{g.label}: cannot {verb} {name!r}: gated attention (use_gate=True) "
                           "is not supported")
    return layer, int(layer.config["num_heads"])


def plan_delete_heads(path, layer, heads, slots="follow", op="delete_heads", params=None):
    """Remove attention ``heads`` (indices) of MultiHeadAttention ``layer``."""
    g, names, cc = load(path)
    lay, n = _mha(g, layer, "delete heads of")
    heads = sorted({int(h) for h in heads})
    bad = [h for h in heads if h < 0 or h >= n]
    if bad:
        raise SurgeonError(f"{path}: {layer!r} has {n} heads (0..{n - 1}); got head {bad[0]}")
    if not heads or len(heads) >= n:
        raise SurgeonError(f"{path}: delete between 1 and {n - 1} heads of {layer!r}; "
                           f"got {len(heads)}")
    keep = [h for h in range(n) if h not in heads]
    lay.config["num_heads"] = len(keep)
    params = params or {"layer": layer, "heads": heads}
    plan = _plan(op, params, path, g, cc, slots, changed_layers=[layer])
    for var, axis in HEAD_AXES.items():
        target = f"{layer}/{var}"
        if target in names:
            plan.add(TensorAction(target, target, steps=[{"op": "take", "axis": axis, "index": keep}],
                                  why=f"{op.replace('_', ' ')} {layer}"))
    return plan


def head_scores(path, layer, by="l1"):
    """Per-head magnitude: the norm of the head's query/key/value slices and output rows."""
    if by not in ("l1", "l2"):
        raise SurgeonError(f"prune criterion {by!r} is not available; choose l1 or l2")
    g, names, _ = load(path)
    _, n = _mha(g, layer, "prune heads of")
    total = np.zeros(n)
    with open_checkpoint(path) as ck:
        for var, axis in HEAD_AXES.items():
            if f"{layer}/{var}" not in names or var.endswith("bias"):
                continue
            w = np.moveaxis(ck.read(f"{layer}/{var}").astype(np.float64), axis, 0).reshape(n, -1)
            total += np.abs(w).sum(1) if by == "l1" else (w ** 2).sum(1)
    return total if by == "l1" else np.sqrt(total)


def plan_prune_heads(path, layer, fraction, by="l1", slots="follow"):
    """Delete the ``fraction`` of ``layer``'s heads with the smallest weight norm."""
    if not 0 < fraction < 1:
        raise SurgeonError(f"--fraction must be in (0, 1), got {fraction}")
    scores = head_scores(path, layer, by)
    n = len(scores)
    k = int(round(fraction * n))
    if k < 1 or k >= n:
        raise SurgeonError(f"{path}: pruning {fraction} of {n} heads of {layer!r} removes {k}; "
                           f"choose a fraction that removes between 1 and {n - 1}")
    drop = sorted(int(i) for i in np.argsort(scores, kind="stable")[:k])
    params = {"layer": layer, "fraction": fraction, "by": by, "heads": drop}
    return plan_delete_heads(path, layer, drop, slots, op="prune_heads", params=params)
