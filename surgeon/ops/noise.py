"""``noise``: add Gaussian noise ``std * N(0, 1)`` (``relative=True``: times the tensor's std).

Seeded per tensor (same seed and name give the same noise). Slot policies:
keep | reset | warm. Default ``keep``.
"""
from __future__ import annotations

from .base import Op, Result, check_number, float_value, like, rng_for


class Noise(Op):
    name = "noise"
    summary = "add seeded Gaussian noise"
    params = {"std": 0.01, "seed": 0, "relative": False}
    slot_policies = ("keep", "reset", "warm")
    default_slots = "keep"

    def check(self, spec):
        check_number(spec, "std", lo=0)
        check_number(spec, "seed", lo=0)

    def apply(self, step, value, ctx):
        v = float_value(value)
        std = float(step.info("std")) * (float(v.std()) if step.info("relative") else 1.0)
        eps = rng_for(step.info("seed"), step.target).normal(0.0, 1.0, v.shape)
        return Result(like(v + std * eps, value))
