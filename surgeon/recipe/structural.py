"""Structural ops inside recipes: ``widen``, ``deepen``, ``delete_channels``, ... .

A recipe may start with structural ops; they run first, each a whole-model rewrite of
a ``.keras`` (config, weights and slots; see :mod:`surgeon.structure`), into a private
temporary directory. The tensor ops that follow then run on the rewritten model, and
only the final result is written to the recipe's output (atomically, with provenance).
"""
from __future__ import annotations

import inspect
import shutil
import tempfile
from pathlib import Path

from surgeon.core.errors import RecipeError, SurgeonError

NAMES = ("widen", "deepen", "delete_channels", "prune_channels", "insert_layer",
         "delete_layer", "replace_layer", "delete_heads", "prune_heads")


def _planner(name):
    from surgeon.structure import PLANNERS
    return PLANNERS[name]


def declare(op_name, params, where):
    """An OpSpec for a structural op, its parameters checked against the planner's."""
    from surgeon.recipe.schema import OpSpec
    params = {k: v for k, v in params.items() if not (k == "select" and v == "*")}
    try:
        inspect.signature(_planner(op_name)).bind("model.keras", **params)
    except TypeError as exc:
        raise RecipeError(f"{where}: op {op_name!r}: {exc}") from None
    return OpSpec(op_name, tuple(sorted(params.items(), key=lambda kv: kv[0])), where)


def split(recipe):
    """(structural specs, remaining specs); structural ops must come first."""
    ops = list(recipe.ops)
    n = 0
    while n < len(ops) and ops[n].op in NAMES:
        n += 1
    for spec in ops[n:]:
        if spec.op in NAMES:
            raise RecipeError(f"{spec.where}: op {spec.op!r}: structural ops must come before "
                              "tensor ops in a recipe (they rewrite the whole model)")
    return ops[:n], ops[n:]


def run(source, specs, workdir):
    """Apply ``specs`` in order starting from ``source``; returns (final path, plans): each plan
    is ``{"where", "text", "plan"}`` (the structural plan's text and JSON)."""
    from surgeon.structure import execute
    current, plans = str(source), []
    if specs and Path(current).suffix != ".keras":
        raise RecipeError(f"{specs[0].where}: op {specs[0].op!r}: structural ops need a .keras "
                          f"input (got {current}); convert it first with `surgeon convert`")
    for i, spec in enumerate(specs):
        try:
            plan = _planner(spec.op)(current, **spec.kwargs)
            nxt = str(Path(workdir) / f"step{i + 1}.keras")
            execute(plan, nxt, log=False)
        except SurgeonError as exc:
            raise RecipeError(f"{spec.where}: op {spec.op!r}: {exc}") from None
        plans.append({"where": str(spec.where), "text": plan.text(), "plan": plan.to_json()})
        current = nxt
    return current, plans


class Workdir:
    """A temporary directory for the intermediate models, removed on exit."""

    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="surgeon-structure-")
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)
