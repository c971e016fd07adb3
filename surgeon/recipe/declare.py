"""Building op declarations: validate parameters and remember the recipe file:line."""
from __future__ import annotations

import sys

from surgeon.core.errors import RecipeError
from .schema import OpSpec, Where, make_selector


def caller_where(depth: int) -> Where:
    """The file and line of the recipe code that called the DSL function."""
    frame = sys._getframe(depth + 1)
    return Where(frame.f_code.co_filename, frame.f_lineno)


def declare(op_name: str, params: dict, where: Where) -> OpSpec:
    """A validated, frozen OpSpec (defaults filled in, select parsed)."""
    from surgeon.ops import registry
    from surgeon.recipe import structural as recipe_ops
    if op_name in recipe_ops.NAMES:
        return recipe_ops.declare(op_name, params, where)
    op = registry.get(op_name, where)
    full = op.validate_params(params, where)
    full["select"] = make_selector(full["select"], where, op_name)
    spec = OpSpec(op_name, tuple(sorted(full.items(), key=lambda kv: kv[0])), where)
    op.check(spec)
    return spec


def redeclare(spec: OpSpec, changes: dict) -> OpSpec:
    """The same op with some parameters changed (``--set ops.N.key=value``), re-validated."""
    params = dict(spec.params)
    params.update(changes)
    if "select" in changes:
        params["select"] = changes["select"]
    elif hasattr(params.get("select"), "to_json"):
        params["select"] = params["select"]
    return declare(spec.op, params, spec.where)


def require(cond, where, msg):
    if not cond:
        raise RecipeError(f"{where}: {msg}")
