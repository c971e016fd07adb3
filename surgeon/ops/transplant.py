"""``transplant``: copy whole layers from another checkpoint, optimizer slots included.

``layers`` lists ``"PATTERN=REPLACEMENT"`` globs (``"encoder/*=backbone/*"``; a bare
layer name such as ``"conv1"`` means all its weights under the same name), or a table
``{pattern: replacement}``. Each ``*`` becomes a back-reference. Shapes must match unless
``on_mismatch`` says otherwise (see ``transfer``). Slot policies: keep | reset | warm |
transplant. Default ``transplant``: the source's slots come along (zero where the source
optimizer has no slot of that kind).
"""
from __future__ import annotations

import re

from surgeon.core.errors import RecipeError
from .transfer import MISMATCH, Transfer


class Transplant(Transfer):
    name = "transplant"
    summary = "copy layers (and their optimizer slots) from another checkpoint"
    params = {"source": None, "layers": None, "on_mismatch": "error", "seed": 0,
              "initializer": "default"}
    default_slots = "transplant"

    def check(self, spec):
        if not spec.get("layers"):
            raise RecipeError(f"{spec.where}: op 'transplant': give layers, e.g. ['encoder/*=backbone/*']")
        if not isinstance(spec.get("source"), str) or not spec.get("source"):
            raise RecipeError(f"{spec.where}: op 'transplant': source must be a checkpoint path")
        if spec.get("on_mismatch") not in MISMATCH:
            raise RecipeError(f"{spec.where}: op 'transplant': on_mismatch must be one of "
                              f"{', '.join(MISMATCH)}")
        layer_map(spec.get("layers"), f"{spec.where}: op 'transplant'")

    def plan(self, spec, ctx):
        from surgeon.recipe.schema import OpSpec, Selector
        pairs = layer_map(spec.get("layers"), f"{spec.where}: op 'transplant'")
        src = ctx.source(spec.get("source"), spec)
        names = [e.name for e in src.entries() if e.role in ("param", "state")]
        for pat, _ in pairs:
            if not any(re.fullmatch(pat, n) for n in names):
                raise RecipeError(f"{spec.where}: op 'transplant': layers pattern {unglob(pat)!r} "
                                  f"matches nothing in {src.path}")
        targets = "|".join(f"(?:{glob_to_regex(r)})" for r in repl_globs(spec.get("layers")))
        params = dict(spec.params) | {"map": pairs, "match": "name", "adapt_input_channels": None,
                                      "select": Selector("re:" + targets)}
        params.pop("layers")
        inner = OpSpec(self.name, tuple(sorted(params.items(), key=lambda kv: kv[0])), spec.where)
        return super().plan(inner, ctx)


    def source_entries(self, spec, src):
        pats = [re.compile(p) for p, _ in spec.get("map")]
        return [e for e in super().source_entries(spec, src)
                if any(p.fullmatch(e.name) for p in pats)]


def repl_globs(layers):
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, dict):
        return list(layers.values())
    return [x.split("=", 1)[1] if "=" in x else x for x in layers]


def glob_to_regex(pattern: str) -> str:
    if not any(c in pattern for c in "*?["):
        pattern = pattern.rstrip("/") + "/*"
    out = []
    for ch in pattern:
        out.append("(.*)" if ch == "*" else "(.)" if ch == "?" else re.escape(ch))
    return "".join(out)


def glob_to_repl(pattern: str) -> str:
    if not any(c in pattern for c in "*?"):
        pattern = pattern.rstrip("/") + "/*"
    out, n = [], 0
    for ch in pattern:
        if ch in "*?":
            n += 1
            out.append(f"\\{n}")
        else:
            out.append(ch.replace("\\", "\\\\"))
    return "".join(out)


def unglob(regex: str) -> str:
    return regex.replace("(.*)", "*").replace("(.)", "?").replace("\\", "")


def layer_map(layers, where):
    """[(regex, replacement)] from ``["a/*=b/*", "conv1"]`` or ``{"a/*": "b/*"}``."""
    if isinstance(layers, str):
        layers = [layers]
    items = list(layers.items()) if isinstance(layers, dict) else \
        [tuple(x.split("=", 1)) if "=" in x else (x, x) for x in layers]
    out = []
    for pat, repl in items:
        if pat.count("*") + pat.count("?") != repl.count("*") + repl.count("?"):
            raise RecipeError(f"{where}: layers {pat!r}={repl!r}: both sides need the same wildcards")
        out.append((glob_to_regex(pat), glob_to_repl(repl)))
    return out
