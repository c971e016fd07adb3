"""``reinit``: draw fresh values from a Keras initializer, seeded per tensor.

``initializer`` is a Keras name (``glorot_uniform``, ``he_normal``, ``zeros``, ``ones``,
``orthogonal``, ``random_normal``, ...), a table ``{class_name, config}``, or
``"default"``: the initializer the model's config declares for that weight (Keras'
defaults when the file has no config). Slot policies: keep | reset | warm. Default ``reset``.
"""
from __future__ import annotations

from surgeon.core.errors import RecipeError
from . import initializers
from .base import Op, Result, check_number, like, rng_for


class Reinit(Op):
    name = "reinit"
    summary = "re-draw tensors from a Keras initializer"
    params = {"initializer": "default", "seed": 0}
    slot_policies = ("keep", "reset", "warm")
    default_slots = "reset"

    def check(self, spec):
        check_number(spec, "seed", lo=0)
        if spec.get("initializer") != "default":
            try:
                initializers.normalize(spec.get("initializer"))
            except RecipeError as exc:
                raise RecipeError(f"{spec.where}: op 'reinit': {exc}") from None

    def detail(self, spec, entry, ctx):
        d = super().detail(spec, entry, ctx)
        d["initializer"] = resolve(spec.get("initializer"), entry, spec.where, ctx.model_json)
        return d

    def apply(self, step, value, ctx):
        rng = rng_for(step.info("seed"), step.target)
        return Result(like(initializers.sample(step.info("initializer"), value.shape, rng), value))


def resolve(init, entry, where, model_json):
    """The concrete initializer spec for ``entry`` (``default`` looked up in the config)."""
    try:
        if init == "default":
            return initializers.for_weight(model_json, entry)
        initializers.normalize(init)
        return init
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
