"""What a diff computes: per-tensor (:class:`TensorDiff`), per-layer (:class:`LayerDiff`)
and whole-run (:class:`DiffResult`) results, JSON-ready. Rendering lives in ``report``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from surgeon.inspect.stream import finite_or_none

STATUSES = ("equal", "changed", "reshaped", "retyped", "added", "removed")


@dataclass
class TensorDiff:
    """The comparison of one canonical name."""

    name: str
    status: str
    role: str
    layer: str
    slot_of: str | None = None
    slot: str | None = None
    shape_a: tuple | None = None
    shape_b: tuple | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    size: int = 0
    n_changed: int = 0
    max_abs: float | None = None
    l2_diff: float | None = None
    norm_a: float | None = None
    norm_b: float | None = None
    dot: float | None = None
    flag: str | None = None
    sample: np.ndarray | None = None

    @property
    def rel_l2(self):
        if self.l2_diff is None or self.norm_a is None:
            return None
        if self.norm_a == 0:
            return 0.0 if self.l2_diff == 0 else None
        return self.l2_diff / self.norm_a

    @property
    def cosine(self):
        if self.dot is None or self.norm_a is None or self.norm_b is None:
            return None
        if self.norm_a == 0 or self.norm_b == 0:
            return 1.0 if self.norm_a == self.norm_b else None
        return max(-1.0, min(1.0, self.dot / (self.norm_a * self.norm_b)))

    @property
    def frac_changed(self):
        if self.status in ("added", "removed", "reshaped"):
            return None
        return self.n_changed / self.size if self.size else 0.0

    def to_json(self) -> dict:
        f = finite_or_none
        return {"name": self.name, "status": self.status, "role": self.role, "layer": self.layer,
                "slot_of": self.slot_of, "slot": self.slot,
                "shape_a": list(self.shape_a) if self.shape_a is not None else None,
                "shape_b": list(self.shape_b) if self.shape_b is not None else None,
                "dtype_a": self.dtype_a, "dtype_b": self.dtype_b, "size": self.size,
                "max_abs": f(self.max_abs), "rel_l2": f(self.rel_l2), "cosine": f(self.cosine),
                "frac_changed": f(self.frac_changed), "n_changed": self.n_changed,
                "l2_diff": f(self.l2_diff), "norm_a": f(self.norm_a), "norm_b": f(self.norm_b),
                "flag": self.flag}


@dataclass
class LayerDiff:
    """Aggregate over a layer's weights (params and states; slots excluded)."""

    layer: str
    tensors: int = 0
    differ: int = 0
    sq_diff: float = 0.0
    sq_a: float = 0.0
    uncompared: dict = field(default_factory=dict)  # status -> count (added/removed/reshaped)

    @property
    def rel_l2(self):
        """Undefined (None) when a weight of the layer has no B-A (added, removed,
        reshaped) or the layer's A is zero while B differs."""
        if self.uncompared:
            return None
        if self.sq_a == 0:
            return 0.0 if self.sq_diff == 0 else None
        return math.sqrt(self.sq_diff / self.sq_a)

    def why_undefined(self) -> str:
        """Why ``rel_l2`` is None, e.g. ``"removed"`` or ``"2 reshaped, 1 added"``."""
        if self.uncompared:
            if len(self.uncompared) == 1 and sum(self.uncompared.values()) == self.tensors:
                return next(iter(self.uncompared))
            return ", ".join(f"{n} {s}" for s, n in self.uncompared.items())
        return "A is zero" if self.rel_l2 is None else ""

    def to_json(self):
        return {"layer": self.layer, "tensors": self.tensors, "differ": self.differ,
                "rel_l2": finite_or_none(self.rel_l2), "uncompared": dict(self.uncompared)}


@dataclass
class DiffResult:
    """Everything ``surgeon diff`` reports."""

    a: dict
    b: dict
    atol: float
    rtol: float
    tensors: list = field(default_factory=list)
    assets: list = field(default_factory=list)  # [(assets/... member, status)] that differ
    # the readers' notes ("A: ...", "B: ...") when tensors are only on one side: why names
    # may differ (a TF checkpoint without nested-model names, an unknown layer class)
    notes: list = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return all(t.status == "equal" for t in self.tensors) and not self.assets

    def counts(self) -> dict:
        c = {s: 0 for s in STATUSES}
        for t in self.tensors:
            c[t.status] += 1
        return c

    def flags(self):
        return [t for t in self.tensors if t.flag]

    def layers(self) -> list:
        out = {}
        for t in self.tensors:
            if t.role not in ("param", "state"):
                continue
            ld = out.setdefault(t.layer, LayerDiff(t.layer))
            ld.tensors += 1
            ld.differ += t.status != "equal"
            if t.l2_diff is not None and t.norm_a is not None:
                ld.sq_diff += t.l2_diff ** 2
                ld.sq_a += t.norm_a ** 2
            elif t.status in ("added", "removed", "reshaped"):
                ld.uncompared[t.status] = ld.uncompared.get(t.status, 0) + 1
        return list(out.values())

    def to_json(self) -> dict:
        return {"equal": self.equal, "a": self.a, "b": self.b, "atol": self.atol, "rtol": self.rtol,
                "summary": self.counts() | {"tensors": len(self.tensors)},
                "tensors": [t.to_json() for t in self.tensors],
                "assets": [{"member": m, "status": st} for m, st in self.assets],
                "layers": [ld.to_json() for ld in self.layers()],
                "flags": [{"tensor": t.name, "message": t.flag} for t in self.flags()],
                "notes": list(self.notes)}
