"""``rescale``: multiply the selected tensors by ``factor``.

Slot policies: keep | reset | warm | follow. Default ``keep``. ``follow`` scales the
slots in their own units: first-moment slots (momentum, average_gradient, ...) by
``factor``, second-moment slots (velocity, velocity_hat, accumulator) by ``factor**2``.
For a function-preserving reparameterisation (the rest of the network compensates, so
gradients scale by 1/factor) use ``factor`` on the weight and ``slots="keep"`` followed by
a second rescale of the slots themselves (``select="optimizer/<name>/*"``).
"""
from __future__ import annotations

import numpy as np

from .base import Op, Result, check_number, float_value, like, slot_power


class Rescale(Op):
    name = "rescale"
    summary = "multiply tensors by a factor"
    params = {"factor": 1.0}
    slot_policies = ("keep", "reset", "warm", "follow")
    default_slots = "keep"

    def check(self, spec):
        check_number(spec, "factor")

    def apply(self, step, value, ctx):
        c = float(step.info("factor"))
        return Result(scaled(value, c), follow=lambda kind, s: scaled(s, c ** slot_power(kind)))


def scaled(arr, c):
    """``like(float_value(arr) * c, arr)``: the same bytes, in one pass without temporaries
    for float32/float64 tensors (the usual ones: no astype copy, no second array)."""
    if arr.dtype == np.float32 or arr.dtype == np.float64:
        return np.asarray(np.multiply(arr, c))  # (a 0-d input gives a scalar)
    return like(float_value(arr) * c, arr)
