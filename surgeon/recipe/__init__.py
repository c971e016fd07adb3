"""recipe: a recipe's whole journey, one way down -- declare (this DSL and
:mod:`~surgeon.recipe.declare`, on the frozen types of :mod:`~surgeon.recipe.schema`) ->
load (:mod:`~surgeon.recipe.loader`: ``recipe.py``/TOML, ``--set``) -> plan
(:mod:`~surgeon.recipe.plan`: validated, printable, no data read) -> execute
(:mod:`~surgeon.recipe.execute`: streaming, structural ops first via
:mod:`~surgeon.recipe.structural`) -> provenance (:mod:`~surgeon.formats.provenance`: the
surgery log in the output). May import core, binding, formats, structure and ops; ops import
only ``recipe.schema`` from here. Not inspect, convert, train or cli.

Recipe DSL: declare input, output and an ordered list of ops in a ``recipe.py``.

Loading a recipe only builds a frozen declaration; nothing is read or applied until
``surgeon apply``. Every op remembers the file:line where it was declared, for errors.

Example (``recipes/reset_head.py``)::

    from surgeon.recipe import recipe, reinit

    RECIPE = recipe(
        input="fixtures/cnn_adam.keras",
        output="out/reset_head.keras",
        ops=[reinit("head/*", initializer="default", seed=0)],
    )

Ops: zero, rescale, clip, reinit, noise, shrink_perturb, cast, mask, transfer, merge,
transplant, rename, delete. Each takes ``select`` (a glob on canonical names, ``re:REGEX``,
or ``select(pattern, layer=, role=, shape=, dtype=)``), ``slots=`` (slot policy:
keep | reset | warm | follow | transplant, per op) and ``again=True`` to allow touching a
tensor an earlier op already wrote.
"""
from __future__ import annotations

from .declare import caller_where, declare
from .loader import apply_overrides, load_recipe
from .schema import OpSpec, Recipe, Selector, check_iteration, make_selector

__all__ = ["recipe", "select", "op", "zero", "rescale", "clip", "reinit", "noise", "shrink_perturb",
           "cast", "mask", "transfer", "transplant", "rename", "delete", "load_recipe",
           "apply_overrides", "Recipe", "OpSpec", "Selector", "widen", "deepen", "delete_channels", "prune_channels", "insert_layer", "delete_layer", "replace_layer", "merge"]


def recipe(input=None, output=None, ops=(), *, iteration="keep", model=None, sources=None):
    """Declare a recipe.

    Args:
        input: the checkpoint to edit (``-i`` overrides it).
        output: where to write the result (``-o`` overrides it).
        ops: the ordered op declarations.
        iteration: ``"keep"``, ``"reset"`` or an int: the optimizer's iteration counter.
        model: for a bare ``.weights.h5`` input, its ``.keras``/``config.json``.
        sources: named extra checkpoints, ``{"pretrained": "path"}``; ops may use the name.
    Returns:
        A frozen ``Recipe``.
    """
    where = caller_where(1)
    ops = tuple(ops)
    for o in ops:
        if not isinstance(o, OpSpec):
            from surgeon.core.errors import RecipeError
            raise RecipeError(f"{where}: ops must be op declarations (zero(...), ...), got {o!r}")
    return Recipe(input=input, output=output, ops=ops, iteration=check_iteration(iteration, where),
                  model=model, sources=tuple(sorted((sources or {}).items())), path=where.file,
                  where=where)


def select(pattern="*", *, layer=None, role=None, shape=None, dtype=None, regex=None) -> Selector:
    """A selector: glob ``pattern`` (or ``regex``) on canonical names plus filters."""
    d = {"pattern": pattern, "layer": layer, "role": role, "shape": shape, "dtype": dtype,
         "regex": regex}
    return make_selector({k: v for k, v in d.items() if v is not None}, caller_where(1), "select")


def _op(name):
    def fn(select="*", **params):
        return declare(name, dict(params, select=select), caller_where(1))
    import importlib
    from surgeon.ops.registry import OPS
    fn.__name__ = name
    fn.__doc__ = importlib.import_module(type(OPS[name]).__module__).__doc__
    return fn


zero = _op("zero")
rescale = _op("rescale")
clip = _op("clip")
reinit = _op("reinit")
noise = _op("noise")
shrink_perturb = _op("shrink_perturb")
cast = _op("cast")
mask = _op("mask")
rename = _op("rename")
delete = _op("delete")


def _structural(name):
    def fn(**params):
        return declare(name, params, caller_where(1))
    fn.__name__ = name
    fn.__doc__ = f"Structural op {name!r} (see ``surgeon.structure.plan_{name}``); runs first."
    return fn


widen = _structural("widen")
deepen = _structural("deepen")
delete_channels = _structural("delete_channels")
prune_channels = _structural("prune_channels")
insert_layer = _structural("insert_layer")
delete_layer = _structural("delete_layer")
replace_layer = _structural("replace_layer")


def transfer(source, select="*", **params):
    """Copy weights from ``source`` (see ``surgeon.ops.transfer``)."""
    return declare("transfer", dict(params, source=source, select=select), caller_where(1))


def transplant(source, layers, **params):
    """Copy ``layers`` (and their slots) from ``source`` (see ``surgeon.ops.transplant``)."""
    return declare("transplant", dict(params, source=source, layers=layers), caller_where(1))


def merge(models, select="*", **params):
    """Merge ``models`` (paths or source names; ``"input"``: the recipe's input) into the
    input's tensors (see ``surgeon.ops.merge``), e.g.
    ``merge(["ft_a.keras", "ft_b.keras"], base="input", method="ties", density=0.5)``."""
    return declare("merge", dict(params, models=list(models), select=select), caller_where(1))


def op(name, select="*", **params):
    """Declare any registered op by name (e.g. one added by a plugin): ``op("zero", "head/*")``."""
    return declare(name, dict(params, select=select), caller_where(1))
