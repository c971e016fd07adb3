"""``merge``: merge the same tensor of several checkpoints (fine-tunes of one base) into the
input's tensors -- linear, task_arithmetic, ties, dare, slerp, model_stock (formulas and
papers: ``surgeon.merging.methods``).

``models`` lists the checkpoints merged (paths, names from the recipe's ``sources``, or
``"input"`` for the recipe's input), ``base`` the common base (task_arithmetic, ties, dare,
model_stock). Any readable format; tensors pair by canonical name and every shape is
checked at plan time, before any value is read. Method parameters: ``weight`` (linear,
task_arithmetic, ties, dare; one value or one per model), ``normalize`` (linear),
``scale`` (λ: task_arithmetic, ties, dare), ``density`` (ties; per model), ``p``,
``combine`` (linear | ties) and ``seed`` (dare), ``t`` (slerp). ``overrides``
(``{"head/*": {"t": 0.8}}``, or ``["head/*:t=0.8"]``) sets parameters per name pattern
(the last matching pattern wins).

Rules: float params are merged; float state (BatchNorm statistics, ``Normalization``)
follows ``state``: ``template`` (default: the input's values are kept) or ``average`` (the
plain mean of the models); non-float tensors (counters, seeds) keep the input's values;
quantized layers are refused (merge the float models, then quantize). A tensor missing
from, or shaped differently in, any model is an error naming it.
Slot policies: reset (default: the merged params' slots restart at zero, with
``iteration="reset"`` a fresh optimizer) | keep.
"""
from __future__ import annotations

import fnmatch
import os

from surgeon.core.errors import RecipeError, SurgeonError
from surgeon.merging.methods import METHODS, NEEDS_BASE, check_params, merge_tensor
from .base import REQUIRED, Op, Result
from .cast import FLOATS, np_dtype

METHOD_KEYS = sorted({k for d in METHODS.values() for k in d})
STATE = ("template", "average")


class Merge(Op):
    name = "merge"
    summary = "merge the tensors of several checkpoints (linear, task arithmetic, TIES, DARE, ...)"
    params = {"models": REQUIRED, "method": "linear", "base": None, "overrides": None,
              "state": "template"} | {k: None for k in METHOD_KEYS}
    slot_policies = ("reset", "keep")
    default_slots = "reset"

    def check(self, spec):
        w = f"{spec.where}: op 'merge'"
        models = spec.get("models")
        if isinstance(models, str) or not isinstance(models, (list, tuple)) or not models \
                or not all(isinstance(m, str) and m for m in models):
            raise RecipeError(f"{w}: models must be a list of checkpoint paths (or source names)")
        if spec.get("state") not in STATE:
            raise RecipeError(f"{w}: state must be one of {', '.join(STATE)}")
        method = spec.get("method")
        if method not in METHODS:
            raise RecipeError(f"{w}: unknown method {method!r}; methods: {', '.join(METHODS)}")
        if method in NEEDS_BASE and not spec.get("base"):
            raise RecipeError(f"{w}: method {method!r} needs base= (the model the others were "
                              "fine-tuned from)")
        if method not in NEEDS_BASE and spec.get("base"):
            raise RecipeError(f"{w}: method {method!r} takes no base; drop base= or use "
                              "task_arithmetic, ties, dare or model_stock")
        for pattern, params in [("*", _given(spec))] + overrides(spec.get("overrides"), w):
            try:
                check_params(method, params, len(models), w if pattern == "*" else
                             f"{w}: overrides {pattern!r}")
            except SurgeonError as exc:
                raise RecipeError(str(exc)) from None

    def plan(self, spec, ctx):
        w = f"{spec.where}: op 'merge'"
        models = [_open(ctx, m, spec) for m in spec.get("models")]
        base = _open(ctx, spec.get("base"), spec) if spec.get("base") else None
        inputs = ([base] if base is not None else []) + models
        ctx.__dict__.setdefault("merge_inputs", {})[ctx.op_index] = (models, base)
        entries = ctx.select(spec)
        for pattern, _ in overrides(spec.get("overrides"), w):
            if not any(fnmatch.fnmatchcase(e.name, pattern) for e in entries):
                raise RecipeError(f"{w}: overrides pattern {pattern!r} matches no merged tensor")
        _check_pairs(entries, inputs, ctx, w)
        steps, kept = [], []
        for e in entries:
            if e.quant:
                raise RecipeError(f"{w}: {e.name} is quantized ({e.quant}); merge the float "
                                  "models, then quantize the result")
            if e.dtype not in FLOATS or (e.role == "state" and spec.get("state") == "template"):
                kept.append(e.name)
                continue
            steps.append(self.step(spec, ctx, e))
        notes = ctx.__dict__.setdefault("notes", [])
        notes.append(f"merge ({spec.where}): {spec.get('method')} of "
                     f"{', '.join(str(r.path) for r in models)}"
                     + (f" on base {base.path}" if base is not None else "")
                     + f"; {len(steps)} tensor(s) merged, {len(kept)} kept from {ctx.reader.path} "
                       "(non-float" + (", float state" if spec.get("state") == "template" else "")
                     + ")")
        if any(e.role in ("slot", "optimizer") for e in ctx.entries):
            notes.append(_optimizer_note(spec, ctx))
        return steps

    def detail(self, spec, entry, ctx):
        if entry.role == "state":  # state="average": the plain mean of the models
            n = len(spec.get("models"))
            return {"method": "linear", "weight": [1.0] * n, "normalize": True}
        params = _given(spec)
        for pattern, extra in overrides(spec.get("overrides"), str(spec.where)):
            if fnmatch.fnmatchcase(entry.name, pattern):
                params = params | extra
        full = check_params(spec.get("method"), params, len(spec.get("models")))
        return {"method": spec.get("method")} | full

    def apply(self, step, value, ctx):
        models, base = _inputs(ctx, step.op_index)
        d = dict(step.detail)
        method = d.pop("method")
        read = lambda r: value if r is ctx.reader else r.read(step.target)  # noqa: E731
        b = read(base) if method != "linear" and base is not None else None
        merged = merge_tensor(method, [read(r) for r in models], b, d, step.target,
                              np_dtype(step.dtype))
        return Result(merged)


def _optimizer_note(spec, ctx):
    if spec.get("slots") == "keep":
        return f"optimizer state kept from {ctx.reader.path} as stored"
    fresh = getattr(ctx.recipe, "iteration", None) == "reset"
    return ("optimizer state dropped: a fresh optimizer (the merged params' slots zero"
            + (", iteration 0" if fresh else "") + "); to keep one input's, "
            + ("pass --optimizer-from NAME" if ctx.recipe and ctx.recipe.path == "surgeon merge"
               else "use slots='keep'"))


def _given(spec) -> dict:
    return {k: spec.get(k) for k in METHOD_KEYS if spec.get(k) is not None}


def overrides(value, where) -> list:
    """``[(pattern, {param: value})]`` from ``{"head/*": {"t": 0.8}}`` or ``["head/*:t=0.8"]``."""
    if value is None:
        return []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [_parse_override(v, where) for v in value]
    else:
        raise RecipeError(f"{where}: overrides must be a table {{pattern: {{param: value}}}} "
                          "or a list of 'PATTERN:PARAM=VALUE'")
    out = []
    for pattern, params in items:
        if not isinstance(params, dict) or not isinstance(pattern, str):
            raise RecipeError(f"{where}: overrides {pattern!r}: give a table of parameters")
        bad = sorted(set(params) - set(METHOD_KEYS))
        if bad:
            raise RecipeError(f"{where}: overrides {pattern!r}: unknown parameter {bad[0]!r}; "
                              f"parameters: {', '.join(METHOD_KEYS)}")
        out.append((pattern, dict(params)))
    return out


def _parse_override(text, where):
    if not isinstance(text, str) or ":" not in text or "=" not in text.rpartition(":")[2]:
        raise RecipeError(f"{where}: override {text!r}: expected 'PATTERN:PARAM=VALUE', "
                          "e.g. 'head/*:t=0.8' or 'head/*:weight=0.2,0.8'")
    pattern, _, assign = text.rpartition(":")
    key, _, raw = assign.partition("=")
    return pattern, {key.strip(): parse_number_list(raw.strip())}


def parse_number_list(raw):
    """``0.8`` -> 0.8, ``0.2,0.8`` -> [0.2, 0.8], ``true``/``false``, else the string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    parts = [p.strip() for p in raw.strip("[]").split(",")]
    try:
        nums = [float(p) if any(c in p for c in ".eE") else int(p) for p in parts]
    except ValueError:
        return raw
    return nums if len(nums) > 1 or "," in raw else nums[0]


def _open(ctx, name, spec):
    """The reader of a model: the recipe's input itself, or a source checkpoint."""
    if name == "input":
        return ctx.reader
    path = ctx.recipe.source_path(name) if ctx.recipe else name
    if os.path.exists(path) and os.path.exists(str(ctx.reader.path)) and \
            os.path.samefile(path, ctx.reader.path):
        return ctx.reader
    return ctx.source(name, spec)


def _inputs(ctx, index):
    """``(models, base)`` readers of op ``index``: those its plan opened, or -- in a worker
    of ``--executor pool|ray``, which computes without planning -- opened again from the
    recipe (the same paths; sources are read-only)."""
    got = ctx.__dict__.setdefault("merge_inputs", {})
    if index not in got:
        spec = ctx.recipe.ops[index]
        models = [_open(ctx, m, spec) for m in spec.get("models")]
        got[index] = (models, _open(ctx, spec.get("base"), spec) if spec.get("base") else None)
    return got[index]


def _check_pairs(entries, inputs, ctx, w):
    """Every merged tensor exists with the same shape in every input, and no input holds a
    weight the template lacks: all names and shapes are checked before any value is read."""
    names = {e.name for e in ctx.entries if e.role in ("param", "state")}
    for r in inputs:
        if r is ctx.reader:
            continue
        theirs = {x.name: x for x in r.entries() if x.role in ("param", "state")}
        for e in entries:
            x = theirs.get(e.name)
            if x is None:
                raise RecipeError(f"{w}: {e.name} is missing from {r.path}; the models must "
                                  f"share one architecture (see `surgeon diff {ctx.reader.path} "
                                  f"{r.path}`)")
            if tuple(x.shape) != tuple(e.shape):
                raise RecipeError(f"{w}: {e.name} has shape {tuple(x.shape)} in {r.path} but "
                                  f"{tuple(e.shape)} in {ctx.reader.path}; models of different "
                                  "shapes cannot be merged")
        extra = sorted(set(theirs) - names)
        if extra:
            raise RecipeError(f"{w}: {r.path} holds {extra[0]}, which {ctx.reader.path} has "
                              "not; the models must share one architecture")
