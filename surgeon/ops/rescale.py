"""``rescale``: multiply the selected tensors by ``factor``.

Slot policies: keep | reset | warm | follow. Default ``keep``. ``follow`` scales the
slots in their own units: first-moment slots (momentum, average_gradient, ...) by
``factor``, second-moment slots (velocity, velocity_hat, accumulator) by ``factor**2``.
For a function-preserving reparameterisation (the rest of the network compensates, so
gradients scale by 1/factor) use ``factor`` on the weight and ``slots="keep"`` followed by
a second rescale of the slots themselves (``select="optimizer/<name>/*"``).
"""
from __future__ import annotations

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
        return Result(like(float_value(value) * c, value),
                      follow=lambda kind, s: like(float_value(s) * c ** slot_power(kind), s))
