"""Tie positional optimizer variables to the params they belong to.

Keras 3 stores optimizer state positionally (``optimizer/vars/<i>``); the link to params
is the model's trainable-variable order plus the optimizer's layout. When that order is
known (a model config), binding is exact and checked against shapes. When it is not
(a bare ``.weights.h5``), only slots whose shape identifies a single param are bound and
the rest are reported as unresolved -- never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import optimizers


@dataclass
class OptVar:
    index: int
    key: str
    shape: tuple
    dtype: str


@dataclass
class Binding:
    """Result: per optimizer-variable index, what it is."""

    layout: optimizers.Layout | None
    globals: dict = field(default_factory=dict)  # index -> global name
    slots: dict = field(default_factory=dict)  # index -> (param, slot)
    unresolved: list = field(default_factory=list)  # indices
    notes: list = field(default_factory=list)


def _split_globals(ovars, trailing=()):
    """Leading iteration/learning_rate scalars; returns (globals dict, rest list)."""
    g, rest = {}, list(ovars)
    if rest and rest[0].shape == () and rest[0].dtype.startswith("int"):
        g[rest[0].index] = "iteration"
        rest = rest[1:]
    if rest and rest[0].shape == () and rest[0].dtype.startswith("float"):
        g[rest[0].index] = "learning_rate"
        rest = rest[1:]
    for name in reversed(trailing):
        if rest and rest[-1].shape == ():
            g[rest[-1].index] = name
            rest = rest[:-1]
    return g, rest


def _matches(layout, params, rest):
    """True when ``rest`` is exactly ``layout`` applied to ``params`` (by shape)."""
    order = layout.order([p for p, _ in params])
    if len(order) != len(rest):
        return False
    shapes = dict(params)
    return all(layout.slot_shape(s, shapes[p]) == v.shape for (p, s), v in zip(order, rest))


def bind_exact(ovars, params, layout):
    """Bind with a known trainable order ``params`` = [(name, shape)] and ``layout``."""
    g, rest = _split_globals(ovars, layout.trailing)
    b = Binding(layout, globals=g)
    if _matches(layout, params, rest):
        for (p, s), v in zip(layout.order([p for p, _ in params]), rest):
            b.slots[v.index] = (p, s)
        return b
    b.unresolved = [v.index for v in rest]
    b.notes.append(
        f"optimizer state does not fit the model: {len(rest)} slot variables, expected "
        f"{len(layout.order(params))} ({len(layout.slots)} per trainable variable x "
        f"{len(params)} trainable variables) with matching shapes")
    return b


def bind_guess_free(ovars, candidates, layouts):
    """Bind without a known order: ``candidates`` = [(name, shape)] possibly-trainable params.

    Tries every ``layouts`` variant; a variant is accepted when the slot shapes follow
    its interleaving. Then a slot is bound only when its shape belongs to exactly one
    candidate param and occurs at exactly one position.
    """
    fits = []
    for layout in layouts:
        g, rest = _split_globals(ovars, layout.trailing)
        k = len(layout.slots)
        if k == 0:
            if not rest:
                fits.append((layout, g, rest, 0))
            continue
        if len(rest) % k:
            continue
        n = len(rest) // k
        if n > len(candidates):
            continue
        positions = [f"#{i}" for i in range(n)]
        shapes = [rest[i * len(layout.groups[0])].shape for i in range(n)] if n else []
        if _matches(layout, list(zip(positions, shapes)), rest):
            fits.append((layout, g, rest, n))
    if len(fits) != 1:
        b = Binding(None)
        g, rest = _split_globals(ovars)
        b.globals, b.unresolved = g, [v.index for v in rest]
        if rest:
            b.notes.append(
                "optimizer layout is ambiguous or unknown "
                f"({len(fits)} candidate layouts fit); pass --model to bind slots")
        return b
    layout, g, rest, n = fits[0]
    b = Binding(layout, globals=g)
    order = layout.order(list(range(n)))
    pos_shape = {}
    for (pos, _), v in zip(order, rest):
        pos_shape[pos] = v.shape
    by_shape = {}
    for name, shape in candidates:
        by_shape.setdefault(shape, []).append(name)
    pos_count = {}
    for shape in pos_shape.values():
        pos_count[shape] = pos_count.get(shape, 0) + 1
    for (pos, slot), v in zip(order, rest):
        shape = pos_shape[pos]
        names = by_shape.get(shape, [])
        if len(names) == 1 and pos_count[shape] == 1:
            b.slots[v.index] = (names[0], slot)
        else:
            b.unresolved.append(v.index)
    if b.unresolved:
        b.notes.append(
            f"{len(b.unresolved)} optimizer slot(s) could not be bound without the "
            "model's trainable-variable order; pass --model FILE.keras|config.json")
    return b
