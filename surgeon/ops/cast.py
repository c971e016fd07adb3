"""``cast``: change the stored dtype (float32 <-> bfloat16 / float16 / float64).

Keras loads the cast file into the model's own variable dtype (a float32 model gets the
rounded values back as float32), so the file shrinks while the model keeps working.
Slot policies: keep | follow (cast the slots too). Default ``keep`` (optimizer state
stays in full precision, as mixed-precision training does).
"""
from __future__ import annotations

import numpy as np

from surgeon.core.errors import RecipeError
from .base import Op, Result

FLOATS = ("float16", "bfloat16", "float32", "float64")


def np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(name)


class Cast(Op):
    name = "cast"
    summary = "change the stored float dtype"
    params = {"dtype": "bfloat16"}
    slot_policies = ("keep", "follow")
    default_slots = "keep"

    def check(self, spec):
        if spec.get("dtype") not in FLOATS:
            raise RecipeError(f"{spec.where}: op 'cast': dtype must be one of {', '.join(FLOATS)}, "
                              f"got {spec.get('dtype')!r}")

    def plan(self, spec, ctx):
        steps = []
        for e in ctx.select(spec):
            if e.dtype not in FLOATS:
                raise RecipeError(f"{spec.where}: op 'cast': {e.name} is {e.dtype}, "
                                  f"which cannot be cast to {spec.get('dtype')}")
            steps.append(self.step(spec, ctx, e, new_dtype=spec.get("dtype")))
        return steps

    def apply(self, step, value, ctx):
        dt = np_dtype(step.new_dtype)
        return Result(value.astype(dt), follow=lambda kind, s: s.astype(dt))
