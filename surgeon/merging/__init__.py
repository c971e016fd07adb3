"""merging: the arithmetic of model merging, one tensor at a time, in numpy -- linear,
task arithmetic, TIES, DARE, SLERP and model stock (:mod:`~surgeon.merging.methods`), with
each method's formula and paper. Knows nothing of files, names or optimizers: it maps the
same tensor of every input (and of the base) to the merged tensor. May import core only;
the ``merge`` op (``surgeon.ops.merge``) and ``surgeon merge`` build on it.
"""
from __future__ import annotations

from .methods import METHODS, PER_MODEL, merge_tensor, method_params

__all__ = ["METHODS", "PER_MODEL", "merge_tensor", "method_params"]
