"""``surgeon merge``: a one-op recipe (``merge``) over a template checkpoint.

The template -- the input whose file layout, config and non-merged tensors the output
keeps, and whose format it is written in -- is the ``optimizer_from`` input when given,
else the base, else the first model. The optimizer state is dropped by default (a fresh
optimizer: the merged params' slots zero, iteration 0) or taken from ``optimizer_from``.
"""
from __future__ import annotations

import os

from surgeon.core.errors import SurgeonError


def _same(a, b) -> bool:
    if a == b:
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _template(models, base, optimizer_from):
    if optimizer_from is None:
        return base or models[0]
    if optimizer_from == "base" and base:
        return base
    for p in ([base] if base else []) + list(models):
        if _same(str(optimizer_from), str(p)):
            return p
    raise SurgeonError(f"--optimizer-from {optimizer_from}: not one of the inputs; name the base "
                       "or one of the models (as given on the command line)")


def _has_iteration(path, model=None) -> bool:
    from surgeon.formats import open_checkpoint
    with open_checkpoint(path, model=model) as ck:
        return any(e.name == "optimizer/iteration" for e in ck.entries())


def merge_checkpoints(models, output=None, base=None, method="linear", params=None,
                      overrides=(), optimizer_from=None, state="template", select="*",
                      dry_run=False, hash_inputs=True, progress=None, text=None, model=None,
                      executor=None):
    """Merge ``models`` (fine-tunes of ``base``) into ``output``.

    Args:
        models: checkpoint paths (any readable format; paired by canonical name).
        output: the merged checkpoint, in the template's format (see the module doc).
        base: the common base (task_arithmetic, ties, dare, model_stock).
        method: linear | task_arithmetic | ties | dare | slerp | model_stock.
        params: method parameters (``weight``, ``density``, ``p`` take one value or one per
            model; ``scale``, ``t``, ``normalize``, ``combine``, ``seed``).
        overrides: ``["PATTERN:PARAM=VALUE", ...]`` or ``{pattern: {param: value}}``.
        optimizer_from: keep this input's optimizer state (default: a fresh optimizer).
        state: float state (BatchNorm statistics): ``template`` (kept) or ``average``.
        select: which tensors are merged (a glob; the others keep the template's values).
        dry_run: plan only (every name and shape checked); nothing read or written.
        model: for bare weights templates (``.weights.h5``, ``.weights.json``): the
            ``.keras``/``config.json`` binding their optimizer slots.
        executor: who computes the merged tensors: ``"local"`` (default), ``"pool"``,
            ``"ray"`` or an executor from ``surgeon.make_executor(name, workers, address)``;
            Ray writes multi-file outputs only (sharded ``.weights.json``, TF checkpoint,
            Orbax), one task per output shard.
    Returns:
        ``(plan, stats)`` as ``surgeon.recipe.execute.apply``; stats is None for a dry run.
    Example:
        >>> merge_checkpoints(["a.keras", "b.keras"], "mid.keras", method="slerp",
        ...                   params={"t": 0.3})
        >>> merge_checkpoints(["a.weights.json", "b.weights.json"], "m.weights.json",
        ...                   model="a.keras", executor=make_executor("ray", workers=8))
    """
    from surgeon.recipe.declare import declare
    from surgeon.recipe.execute import apply
    from surgeon.recipe.schema import Recipe, Where
    models = [str(m) for m in models]
    if not models:
        raise SurgeonError("merge: give the models to merge")
    base = str(base) if base else None
    where = Where("surgeon merge", 0)
    template = _template(models, base, optimizer_from)
    names = ["input" if _same(m, template) else m for m in models]
    base_name = None if base is None else ("input" if _same(base, template) else base)
    for p in [base, *models]:
        if p and not os.path.exists(p) and not os.path.exists(f"{p}.index"):
            raise SurgeonError(f"{p}: no such file")
    spec = declare("merge", dict(params or {}, models=names, method=method, base=base_name,
                                 overrides=_overrides(overrides), state=state, select=select,
                                 slots="keep" if optimizer_from else "reset"), where)
    model = str(model) if model else None
    iteration = "keep" if optimizer_from or not _has_iteration(template, model) else "reset"
    rec = Recipe(input=template, output=str(output) if output else None, ops=(spec,),
                 iteration=iteration, path="surgeon merge", text=text or _text(models, base, method),
                 where=where, model=model)
    if executor is None or isinstance(executor, str):
        from surgeon.recipe.executors import make_executor
        executor = make_executor(executor)
    return apply(rec, dry_run=dry_run, progress=progress, hash_inputs=hash_inputs,
                 make_dirs=True, executor=executor)


def _overrides(value):
    if not value:
        return None
    return dict(value) if isinstance(value, dict) else list(value)


def _text(models, base, method):
    return " ".join(["surgeon merge"] + ([f"--base {base}"] if base else []) + models
                    + [f"--method {method}"])
