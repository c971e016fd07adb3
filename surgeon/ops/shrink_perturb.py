"""``shrink_perturb``: ``w <- shrink * w + perturb * eps``, eps drawn from an initializer.

The warm-start recipe of Ash & Adams (2020, "On Warm-Starting Neural Network Training"):
shrink weights toward zero and add a little fresh-initialisation noise, which restores
the ability to generalise when training continues on more data. ``initializer`` defaults
to the weight's own initializer from the model config. Slot policies:
keep | reset | warm | follow (slots scaled by ``shrink`` / ``shrink**2``). Default ``reset``.
"""
from __future__ import annotations

from .base import Op, Result, check_number, float_value, like, rng_for, slot_power
from . import initializers
from .reinit import resolve


class ShrinkPerturb(Op):
    name = "shrink_perturb"
    summary = "shrink toward zero and add initializer noise (Ash & Adams 2020)"
    params = {"shrink": 0.4, "perturb": 0.1, "seed": 0, "initializer": "default"}
    slot_policies = ("keep", "reset", "warm", "follow")
    default_slots = "reset"

    def check(self, spec):
        check_number(spec, "shrink", lo=0)
        check_number(spec, "perturb", lo=0)
        check_number(spec, "seed", lo=0)

    def detail(self, spec, entry, ctx):
        d = super().detail(spec, entry, ctx)
        d["initializer"] = resolve(spec.get("initializer"), entry, spec.where, ctx.model_json)
        return d

    def apply(self, step, value, ctx):
        lam, p = float(step.info("shrink")), float(step.info("perturb"))
        eps = initializers.sample(step.info("initializer"), value.shape,
                                  rng_for(step.info("seed"), step.target))
        return Result(like(lam * float_value(value) + p * eps, value),
                      follow=lambda kind, s: like(float_value(s) * lam ** slot_power(kind), s))
