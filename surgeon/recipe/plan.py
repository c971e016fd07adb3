"""Plan a recipe against a checkpoint: resolve every op to steps, validate, read no data.

The plan lists, for every affected tensor, the op, source, target, shape and dtype
before/after and what happens to each of its optimizer slots and to the iteration
counter. It is fully checked (names resolve, shapes fit, dtypes castable, no tensor
written twice unless an op says ``again=True``) before any tensor value is read.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from surgeon.core.errors import RecipeError, SurgeonError
from surgeon.ops import registry
from surgeon.recipe.schema import spell



@dataclass
class Plan:
    """The validated list of steps (JSON-serialisable; what ``--dry-run`` prints)."""

    input: str
    output: str | None
    format: str
    steps: list
    iteration: dict | None = None
    reports: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    recipe: str = ""
    structural: list = field(default_factory=list)  # whole-model rewrites run before the steps
    notes: list = field(default_factory=list)  # what ops say about the whole run (merge: inputs, rules)

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "input": self.input, "output": self.output,
                "format": self.format, "structural": [s["plan"] | {"where": s["where"]} for s in self.structural],
                "steps": [s.to_json() for s in self.steps],
                "iteration": self.iteration, "reports": self.reports, "warnings": self.warnings,
                "notes": self.notes}


class PlanContext:
    """What ops see while planning and executing: the input, sources, selection helpers."""

    def __init__(self, recipe, reader, model_json=None):
        self.recipe = recipe
        self.reader = reader
        self.entries = reader.entries()
        self.by_name = {e.name: e for e in self.entries}
        self.model_json = model_json if model_json is not None else getattr(reader, "config", None)
        self.sources = {}
        self.reports = []
        self.op_index = 0
        self.notes = []
        self._masks = None
        from surgeon.formats import REGISTRY
        mod, _, writer = REGISTRY.get(reader.format, (None, None, None))
        self.writer_class = _writer_class(mod, writer)

    def slots_of(self, name):
        return [e for e in self.entries if e.role == "slot" and e.slot_of == name]

    def select(self, spec):
        """Entries chosen by the op's selector; error (file:line) when it matches nothing."""
        sel = spec.get("select")
        roles = sel.roles or (("slot",) if sel.pattern.startswith("optimizer/") else ("param", "state"))
        if sel.pattern.startswith("re:"):
            rx = re.compile(sel.pattern[3:])
            name_ok = lambda n: rx.fullmatch(n) is not None  # noqa: E731
        else:
            name_ok = lambda n: fnmatch.fnmatchcase(n, sel.pattern)  # noqa: E731
        out = [e for e in self.entries if e.role in roles and name_ok(e.name)
               and (sel.layer is None or fnmatch.fnmatchcase(e.layer, sel.layer))
               and (sel.dtype is None or e.dtype == sel.dtype)
               and (sel.shape is None or _shape_ok(e.shape, sel.shape))]
        if not out:
            raise RecipeError(f"{spec.where}: op {spec.op!r}: selector {sel.describe()} matches "
                              f"nothing in {self.reader.path}")
        return out

    def slot_actions(self, entry, policy):
        if entry.role != "param":
            return ()
        return tuple((s.name, policy) for s in self.slots_of(entry.name))

    def source(self, name, spec=None):
        """A reader for a source checkpoint (a path or a name from the recipe's sources)."""
        path = self.recipe.source_path(name) if self.recipe else name
        if path not in self.sources:
            from surgeon.formats import open_checkpoint
            try:
                self.sources[path] = open_checkpoint(path)
            except SurgeonError as exc:
                where = f"{spec.where}: op {spec.op!r}: source: " if spec else ""
                raise RecipeError(f"{where}{exc}") from None
        return self.sources[path]

    def existing_mask(self, name):
        if self._masks is None:
            from surgeon.ops.mask import read_masks
            self._masks = read_masks(self.reader) if hasattr(self.reader, "read_key") else {}
        return self._masks.get(name)

    def close(self):
        for r in self.sources.values():
            r.close()
        self.sources = {}

    def forkable(self) -> bool:
        """True when every reader can take fresh handles in a forked worker (``after_fork``)."""
        return all(hasattr(r, "after_fork") for r in [self.reader, *self.sources.values()])

    def after_fork(self):
        """In a forked pool worker: the planned context, with readers of this process."""
        for r in [self.reader, *self.sources.values()]:
            r.after_fork()


def _writer_class(mod, writer):
    if not mod or not writer:
        return None
    import importlib
    try:
        return getattr(importlib.import_module(f"surgeon.formats.{mod}"), writer, None)
    except ImportError:
        return None


def _shape_ok(shape, want):
    return len(shape) == len(want) and all(w is None or w == s for s, w in zip(shape, want))


def make_plan(recipe, ctx: PlanContext, output=None) -> Plan:
    """Resolve ``recipe`` against the context's input checkpoint (no tensor data read)."""
    steps, written = [], {}
    for i, spec in enumerate(recipe.ops):
        ctx.op_index = i
        op_steps = registry.get(spec.op, spec.where).plan(spec, ctx)
        for s in op_steps:
            _check_fits(s, ctx, spec)
            _check_quantized(s, ctx, spec)
            _check_slots_bound(s, ctx, spec)
            touched = [s.target] + [n for n, p in s.slots if p != "keep"]
            for name in touched:
                prev = written.get(name)
                if prev is not None and prev is not spec and not spec.get("again"):
                    raise RecipeError(f"{spec.where}: op {spec.op!r}: {name} is already written by "
                                      f"op {prev.op!r} ({prev.where}); to apply both in order, add "
                                      f"{spell(spec.where, 'again', True)} to this op")
                written[name] = spec
        steps.extend(op_steps)
    iteration = _iteration(recipe, ctx)
    if iteration and iteration.get("target") in written:
        raise RecipeError(f"{recipe.where}: iteration policy and an op both write optimizer/iteration")
    plan = Plan(str(ctx.reader.path), str(output) if output else recipe.output, ctx.reader.format,
                steps, iteration, ctx.reports, recipe=recipe.path, notes=ctx.notes)
    plan.warnings.extend(_bias_warnings(plan, ctx, recipe.where))
    return plan


def _check_fits(step, ctx, spec):
    e = ctx.by_name[step.target]
    if tuple(step.shape) != tuple(e.shape):
        raise RecipeError(f"{spec.where}: op {spec.op!r}: {step.target} would become "
                          f"{step.shape}, but the model needs {e.shape}")


def _check_quantized(step, ctx, spec):
    e = ctx.by_name[step.target]
    if e.quant:
        from surgeon.binding.quantized import refusal
        raise RecipeError(f"{spec.where}: op {spec.op!r}: {refusal(e, spec.op)}")


def _check_slots_bound(step, ctx, spec):
    """A slot policy other than ``keep`` on a param whose slots are not bound cannot be
    honoured: an error, never a silent "0 slot changes"."""
    policy = spec.get("slots")
    e = ctx.by_name[step.target]
    if policy in (None, "keep") or e.role != "param" or e.frozen:
        return
    odd = [n for n, _ in step.slots if tuple(ctx.by_name[n].shape) != tuple(e.shape)]
    if odd:
        raise RecipeError(f"{spec.where}: op {spec.op!r}: slots={policy!r} for {e.name}, but its "
                          f"slot {odd[0]} is factored (shape {tuple(ctx.by_name[odd[0]].shape)}, "
                          f"not the param's); use slots='keep'")
    if step.slots:
        return
    unbound = [x.name for x in ctx.entries if x.role == "slot" and not x.slot_of]
    if unbound:
        raise RecipeError(
            f"{spec.where}: op {spec.op!r}: slots={policy!r} for {e.name}, but its optimizer "
            f"slots are not bound to it ({len(unbound)} unbound optimizer tensor(s), e.g. "
            f"{unbound[0]}; see `surgeon ls`); pass --model for a bare weights file, or "
            "slots='keep' to leave the optimizer state as it is")


def _iteration(recipe, ctx):
    policy = recipe.iteration
    if policy == "keep":
        return None
    e = ctx.by_name.get("optimizer/iteration")
    if e is None:
        raise RecipeError(f"{recipe.where}: {spell(recipe.where, 'iteration', policy)}, but "
                          f"{ctx.reader.path} has no optimizer iteration counter")
    info = ctx.reader.metadata().get("optimizer") or {}
    after = 0 if policy == "reset" else int(policy)
    out = {"target": e.name, "policy": policy if policy == "reset" else f"set {after}",
           "before": info.get("iterations"), "after": after}
    from surgeon.binding.optimizers import accumulation_steps
    steps = accumulation_steps(getattr(getattr(ctx.reader, "optimizer", None), "config", None))
    if steps > 1:  # the stored counter counts micro-steps: Keras' iterations x steps
        out["stored"] = after * steps
    return out


def _bias_warnings(plan, ctx, where=None):
    info = ctx.reader.metadata().get("optimizer") or {}
    from surgeon.binding.optimizers import RESET_RATIO_LIMIT, reset_step_ratio
    cls = info.get("class_name")
    cfg = getattr(getattr(ctx.reader, "optimizer", None), "config", {}) or {}
    t = plan.iteration["after"] if plan.iteration else (info.get("iterations") or 0)
    ratio = reset_step_ratio(cls, cfg, t)
    reset = sorted({s.target for s in plan.steps for n, p in s.slots
                    if p == "reset" and n.endswith(("/velocity", "/norm"))})
    if ratio is None or not reset or ratio < RESET_RATIO_LIMIT:
        return []
    return [f"{len(reset)} tensor(s) get zeroed {cls} slots at iteration {t} (e.g. {reset[0]}): "
            f"their first updates will be ~{ratio:.1f}x a normal step because bias correction "
            f"no longer compensates; use {spell(where, 'slots', 'warm')} (second moments kept at "
            f"their mean) or {spell(where, 'iteration', 'reset')}"]


def open_input(recipe):
    """Open the recipe's input checkpoint (with its ``model``) as a reader."""
    from surgeon.formats import open_checkpoint
    if not recipe.input:
        raise RecipeError(f"{recipe.path}: the recipe names no input; pass -i CHECKPOINT")
    if "://" not in str(recipe.input) and not Path(recipe.input).exists() and \
            not Path(str(recipe.input) + ".index").exists():
        raise RecipeError(f"{recipe.where}: input {recipe.input}: no such file")
    return open_checkpoint(recipe.input, model=recipe.model)


def model_json_for(recipe):
    if recipe.model is None:
        return None
    from surgeon.formats.keras_h5 import read_model_json
    return read_model_json(recipe.model)
