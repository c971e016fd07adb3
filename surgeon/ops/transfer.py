"""``transfer``: copy weights from a pretrained checkpoint into the input's tensors.

Pairs are found by ``map`` (``{source regex: target replacement}`` with back-references,
e.g. ``{"encoder/(.*)": "backbone/\\\\1"}``), else by identical name and then
(``match="auto"``) by order among same-shaped leftovers. Every pair whose shapes differ
follows ``on_mismatch``: ``error`` | ``skip`` (keep the target's value) | ``slice`` (take
the source's leading block) | ``pad`` (source into the leading block, the rest keeps the
target's values) | ``reinit`` (fresh values from the target's initializer).
``adapt_input_channels`` (``auto`` | ``sum`` | ``repeat``) adapts a kernel whose input
channel axis (-2) differs, as timm's ``adapt_input_conv`` does: sum over channels for a
single-channel target, else repeat the channels and rescale by ``in/out``.
Slot policies: keep | reset | warm | transplant (the source's slots, sliced or padded the
same way; zero when the source has none). Default ``reset``.
"""
from __future__ import annotations

import math
import re

import numpy as np

from surgeon.core.errors import RecipeError
from . import initializers
from .base import Op, Result, float_value, like, rng_for
from .reinit import resolve

MISMATCH = ("error", "skip", "slice", "pad", "reinit")
ADAPT = (None, "auto", "sum", "repeat")


class Transfer(Op):
    name = "transfer"
    summary = "copy weights from a pretrained checkpoint (name map, auto match, mismatch policy)"
    params = {"source": None, "map": None, "match": "auto", "on_mismatch": "error",
              "adapt_input_channels": None, "seed": 0, "initializer": "default"}
    slot_policies = ("keep", "reset", "warm", "transplant")
    default_slots = "reset"

    def check(self, spec):
        w = f"{spec.where}: op {self.name!r}"
        if not isinstance(spec.get("source"), str) or not spec.get("source"):
            raise RecipeError(f"{w}: source must be a checkpoint path (or a name in sources)")
        if spec.get("on_mismatch") not in MISMATCH:
            raise RecipeError(f"{w}: on_mismatch must be one of {', '.join(MISMATCH)}")
        if spec.get("adapt_input_channels") not in ADAPT:
            raise RecipeError(f"{w}: adapt_input_channels must be auto, sum or repeat")
        if spec.get("match") not in ("auto", "name", "order"):
            raise RecipeError(f"{w}: match must be auto, name or order")
        for pat, _ in map_pairs(spec.get("map"), w):
            try:
                re.compile(pat)
            except re.error as exc:
                raise RecipeError(f"{w}: bad map regex {pat!r}: {exc}") from None

    # -- planning ------------------------------------------------------------------------
    def plan(self, spec, ctx):
        src = ctx.source(spec.get("source"), spec)
        targets = ctx.select(spec)
        sources = self.source_entries(spec, src)
        pairs = self.pairs(spec, targets, sources)
        report = {"op": self.name, "where": str(spec.where), "source": str(src.path),
                  "matched": [], "mismatched": [], "unmatched_targets": [], "unused_sources": []}
        steps, errors = [], []
        for t, s, how in pairs:
            mode = self.mode(spec, t, s)
            entry = {"target": t.name, "source": s.name, "by": how}
            if mode == "error":
                errors.append((t, s))
                continue
            if mode != "copy":
                report["mismatched"].append(entry | {"action": mode, "source_shape": list(s.shape),
                                                     "shape": list(t.shape)})
            else:
                report["matched"].append(entry)
            if mode != "skip":
                steps.append(self.make_step(spec, ctx, t, s, mode))
        if errors:
            t, s = errors[0]
            raise RecipeError(f"{spec.where}: op {self.name!r}: {len(errors)} shape mismatch(es), "
                              f"first: {s.name} {fmt(s.shape)} -> {t.name} {fmt(t.shape)}; "
                              + mismatch_advice(spec, t.shape, s.shape))
        used_t = {t.name for t, _, _ in pairs}
        used_s = {s.name for _, s, _ in pairs}
        report["unmatched_targets"] = [t.name for t in targets if t.name not in used_t]
        report["unused_sources"] = [s.name for s in sources if s.name not in used_s]
        if not pairs:
            raise RecipeError(f"{spec.where}: op {self.name!r}: no tensor of {src.path} matches "
                              f"the selected targets ({len(targets)} selected)")
        ctx.reports.append(report)
        return steps

    def source_entries(self, spec, src):
        return [e for e in src.entries() if e.role in ("param", "state")]

    def pairs(self, spec, targets, sources):
        by_name = {t.name: t for t in targets}
        pairs, taken = [], set()
        mp = map_pairs(spec.get("map"), f"{spec.where}")
        for s in sources:
            name = map_name(mp, s.name) if mp else (s.name if spec.get("match") != "order" else None)
            if name in by_name and name not in taken:
                pairs.append((by_name[name], s, "map" if mp else "name"))
                taken.add(name)
        if spec.get("match") in ("auto", "order") and not mp:
            used = {s.name for _, s, _ in pairs}
            rest = [s for s in sources if s.name not in used]
            for t in targets:
                if t.name in taken:
                    continue
                k = next((i for i, s in enumerate(rest) if s.shape == t.shape and s.role == t.role), None)
                if k is not None:
                    pairs.append((t, rest.pop(k), "order+shape"))
                    taken.add(t.name)
        return pairs

    def mode(self, spec, t, s):
        if tuple(t.shape) == tuple(s.shape):
            return "copy"
        adapt = spec.get("adapt_input_channels")
        if adapt and channels_only(t.shape, s.shape):
            return "adapt-" + ("sum" if adapt == "auto" and t.shape[-2] == 1 else
                               "repeat" if adapt == "auto" else adapt)
        policy = spec.get("on_mismatch")
        if policy == "slice" and not fits(t.shape, s.shape, smaller=True):
            return "error"
        if policy == "pad" and not fits(t.shape, s.shape, smaller=False):
            return "error"
        return policy

    def make_step(self, spec, ctx, t, s, mode):
        if mode == "adapt-sum" and t.shape[-2] != 1:
            from surgeon.recipe.schema import spell
            raise RecipeError(f"{spec.where}: op {self.name!r}: "
                              f"{spell(spec.where, 'adapt_input_channels', 'sum')} needs "
                              f"a single-channel target, {t.name} has {t.shape[-2]}")
        detail = {"source_path": spec.get("source"), "mode": mode}
        if mode == "reinit":
            detail |= {"initializer": resolve(spec.get("initializer"), t, spec.where, ctx.model_json),
                       "seed": spec.get("seed")}
        slots = ctx.slot_actions(t, spec.get("slots"))
        if spec.get("slots") == "transplant" and mode.startswith(("adapt", "reinit")):
            slots = tuple((n, "reset") for n, _ in slots)
        return self.step(spec, ctx, t, source=s.name, source_shape=s.shape, slots=slots,
                         detail=tuple(sorted(detail.items())))

    def detail(self, spec, entry, ctx):
        return {}

    # -- execution -----------------------------------------------------------------------
    def apply(self, step, value, ctx):
        src = ctx.source(step.info("source_path"))
        mode = step.info("mode")
        if mode == "reinit":
            rng = rng_for(step.info("seed"), step.target)
            return Result(like(initializers.sample(step.info("initializer"), value.shape, rng), value))
        new = adapt(float_value(src.read(step.source)), value, mode)

        def source_slot(kind):
            name = f"optimizer/{step.source}/{kind}"
            if mode.startswith("adapt") or not any(e.name == name for e in src.entries()):
                return None
            s = float_value(src.read(name))
            return adapt(s, np.zeros(value.shape, s.dtype), mode)

        return Result(like(new, value), source_slot=source_slot)


def adapt(src, target, mode):
    """``src`` made to fit ``target``'s shape by ``mode`` (copy, slice, pad, adapt-*)."""
    if mode == "copy":
        return src
    if mode == "slice":
        return src[tuple(slice(0, n) for n in target.shape)]
    if mode == "pad":
        out = float_value(target).copy()
        out[tuple(slice(0, n) for n in src.shape)] = src
        return out
    c_out, c_in = target.shape[-2], src.shape[-2]
    if mode == "adapt-sum":
        return src.sum(axis=-2, keepdims=True)
    reps = math.ceil(c_out / c_in)
    tiled = np.concatenate([src] * reps, axis=-2)[..., :c_out, :]
    return tiled * (c_in / float(c_out))


def mismatch_advice(spec, t, s):
    """What to do about a source of shape ``s`` that does not fit target shape ``t`` under
    the op's ``on_mismatch`` (said in the syntax the op was declared in)."""
    from surgeon.recipe.schema import spell
    policy = spec.get("on_mismatch")
    say = lambda v: spell(spec.where, "on_mismatch", v)  # noqa: E731
    fits_slice, fits_pad = fits(t, s, smaller=True), fits(t, s, smaller=False)
    fix = (f"{say('slice')} (keeps the source's leading block)" if fits_slice else
           f"{say('pad')} (source into the leading block, the rest keeps the target's values)"
           if fits_pad else None)
    alt = f"{say('reinit')} (fresh values) or {say('skip')} (keep the target's)"
    if policy == "slice":
        head = "slice only shrinks (it takes the source's leading block), and the target is " + \
               ("larger" if fits_pad else "not smaller in every axis" if len(t) == len(s) else
                "of another rank")
    elif policy == "pad":
        head = "pad only grows (it puts the source into the target's leading block), and the " \
               "target is " + ("smaller" if fits_slice else "not larger in every axis"
                               if len(t) == len(s) else "of another rank")
    else:
        return f"use {fix} or {alt}" if fix else f"use {alt}"
    return f"{head}; use {fix} or {alt}" if fix else f"{head}; use {alt}"


def channels_only(t, s):
    return len(t) >= 3 and len(t) == len(s) and t[-2] != s[-2] and \
        all(a == b for i, (a, b) in enumerate(zip(t, s)) if i != len(t) - 2)


def fits(t, s, smaller):
    if len(t) != len(s):
        return False
    return all((a <= b) if smaller else (a >= b) for a, b in zip(t, s))


def fmt(shape):
    return "x".join(str(d) for d in shape) or "scalar"


def map_pairs(mp, where):
    """``map`` as a list of (regex, replacement)."""
    if mp is None:
        return []
    if isinstance(mp, dict):
        return list(mp.items())
    try:
        return [(str(a), str(b)) for a, b in mp]
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: map must be a table {{regex: replacement}} or a list of pairs") from None


def map_name(pairs, name):
    for pat, repl in pairs:
        m = re.fullmatch(pat, name)
        if m:
            return m.expand(repl)
    return None
