"""``apply``/``transplant --in-place``: run a recipe's tensor ops on its input file where it
lies (see ``surgeon.formats.inplace`` for the writer and ``surgeon.core.journal`` for the
crash safety).

What is refused, in one line, before the file is touched: another output path, structural
ops (they change the model), ``cast`` or any op changing a dtype, formats other than
``.keras`` / ``.weights.h5`` / legacy ``.h5`` (and a ``.keras`` whose weights member is
compressed). The surgery log is appended to the file's own log like any output's; its
record says ``"in_place": true`` and records the edited file's sha256 as null: hashing it
would read every byte (O(file size)), which is what editing in place avoids. Sources (a
transplant's donor) are hashed as usual (unless ``hash_inputs`` is False).
"""
from __future__ import annotations

import os


def _refuse(path, why, **hint):
    from surgeon.formats.inplace import refuse
    refuse(path, why, **hint)


def check_recipe(recipe):
    """Refuse, before opening anything for writing, what cannot be done in place."""
    from surgeon.core.errors import RecipeError
    from surgeon.recipe import structural
    path = recipe.input
    if not path:
        raise RecipeError(f"{recipe.path}: the recipe names no input; pass -i CHECKPOINT")
    if recipe.output and not _same(recipe.output, path):
        _refuse(path, f"--in-place writes the input itself, not {recipe.output}",
                hint="drop -o, or drop --in-place")
    rewrites, _ = structural.split(recipe)
    if rewrites:
        _refuse(path, f"the structural op {rewrites[0].op} changes the model's structure")
    cast = next((op for op in recipe.ops if op.op == "cast"), None)
    if cast is not None:
        _refuse(path, "cast changes tensor dtypes")


def _same(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def apply_in_place(recipe, progress=None, hash_inputs=True, early=None):
    """Apply ``recipe``'s tensor ops to its input in place; ``(plan, stats)``, where
    ``stats.bytes_written`` counts the bytes written into the file. ``early``: a
    ``surgeon.formats.clone.EarlyStart`` already hashing the sources (adopted)."""
    from surgeon.core import __version__
    from surgeon.formats import provenance
    from surgeon.formats.inplace import check_format, open_in_place
    from .execute import run
    from .plan import PlanContext, make_plan, model_json_for, open_input

    check_recipe(recipe)
    path = recipe.input
    hasher = early.hasher if early is not None and early.hasher.enabled and hash_inputs \
        else provenance.Hasher(hash_inputs)
    hasher.skip.add(str(path))
    try:
        with open_input(recipe) as reader:  # (opening rolls back an interrupted edit)
            check_format(reader)
            ctx = PlanContext(recipe, reader, model_json_for(recipe))
            try:
                plan = make_plan(recipe, ctx, output=path)
                changed = next((s for s in plan.steps if s.dtype != s.new_dtype), None)
                if changed is not None:
                    _refuse(path, f"{changed.op} changes the dtype of {changed.target}")
                for src in ctx.sources:
                    hasher.start(src)
                inputs = {"input": path} | {f"source:{p}": p for p in ctx.sources}
                with open_in_place(reader) as writer:
                    stats = run(plan, ctx, writer, progress)
                    record = provenance.make_record(recipe, plan, inputs, __version__, hasher)
                    record["in_place"] = True
                    provenance.embed(writer, reader.format, provenance.read_log(path) + [record])
                    writer.finalize()
                stats.bytes_written = writer.bytes_written
                return plan, stats
            finally:
                ctx.close()
    finally:
        hasher.close()
