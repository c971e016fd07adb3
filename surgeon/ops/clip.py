"""``clip``: clip the selected tensors to ``[min, max]`` (either may be omitted).

Slot policies: keep | reset | warm (applied to the clipped elements only). Default ``keep``.
"""
from __future__ import annotations

import numpy as np

from surgeon.core.errors import RecipeError
from .base import Op, Result, check_number, float_value, like


class Clip(Op):
    name = "clip"
    summary = "clip tensors to [min, max]"
    params = {"min": None, "max": None}
    slot_policies = ("keep", "reset", "warm")
    default_slots = "keep"

    def check(self, spec):
        check_number(spec, "min", allow_none=True)
        check_number(spec, "max", allow_none=True)
        lo, hi = spec.get("min"), spec.get("max")
        if lo is None and hi is None:
            raise RecipeError(f"{spec.where}: op 'clip': give min, max or both")
        if lo is not None and hi is not None and lo > hi:
            raise RecipeError(f"{spec.where}: op 'clip': min {lo} is greater than max {hi}")

    def apply(self, step, value, ctx):
        v = float_value(value)
        new = np.clip(v, step.info("min"), step.info("max"))
        return Result(like(new, value), touched=new != v)
