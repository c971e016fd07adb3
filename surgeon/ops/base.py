"""The op plugin protocol: what an op selects, how it maps a tensor and that tensor's slots.

An op declares its parameters (with defaults), the slot policies it allows and its
default one. ``plan()`` turns a declared op into Steps using only entries (no data);
``apply()`` maps one tensor's value and says what happens to its optimizer slots.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from surgeon.core.errors import RecipeError

REQUIRED = object()
SLOT_POLICIES = ("keep", "reset", "warm", "follow", "transplant")
SLOT_POLICY_HELP = {
    "keep": "slots untouched",
    "reset": "slots of the touched elements set to zero",
    "warm": "touched elements: first-moment slots zero, second-moment slots set to the "
            "tensor's mean (avoids Adam's bias-correction jump)",
    "follow": "the op's own transform applied to the slots (scale, slice, pad; new elements zero)",
    "transplant": "the source checkpoint's slots brought along (same slice/pad; zero if absent)",
}
# Slots holding squared-gradient statistics scale with c**2 when gradients scale with c.
SECOND_MOMENT = {"velocity", "velocity_hat", "accumulator", "accumulated_grad",
                 "accumulated_delta_var", "r", "c"}


def slot_power(kind: str) -> int:
    return 2 if kind in SECOND_MOMENT else 1


def rng_for(seed: int, name: str) -> np.random.Generator:
    """A generator that depends only on the seed and the tensor name (order-independent)."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


@dataclass(frozen=True)
class Step:
    """One planned change to one target tensor (and what happens to its slots)."""

    op: str
    where: str
    target: str
    shape: tuple
    dtype: str
    new_dtype: str
    source: str | None = None
    source_shape: tuple | None = None
    slots: tuple = ()          # ((slot canonical name, policy), ...)
    detail: tuple = ()         # ((key, json-able value), ...)
    op_index: int = 0

    def info(self, key, default=None):
        return dict(self.detail).get(key, default)

    def to_json(self) -> dict:
        return {"op": self.op, "where": self.where, "target": self.target,
                "source": self.source, "shape": list(self.shape),
                "source_shape": list(self.source_shape) if self.source_shape is not None else None,
                "dtype": self.dtype, "new_dtype": self.new_dtype,
                "slots": {n: p for n, p in self.slots}, "detail": dict(self.detail)}


@dataclass
class Result:
    """What ``apply`` returns: the new value and how slots are affected.

    ``touched`` is a boolean mask of changed elements (None: all). ``follow(kind, arr)``
    maps a slot for the ``follow`` policy; ``source_slot(kind)`` gives the source's slot
    (already adapted to the target shape) for ``transplant``, or None.
    """

    value: np.ndarray
    touched: np.ndarray | None = None
    follow: object = None
    source_slot: object = None
    extras: dict = field(default_factory=dict)


class Op:
    """Base class of ops. Subclasses set ``name``, ``params``, ``slot_policies``, ``default_slots``."""

    name = ""
    summary = ""
    params: dict = {}
    slot_policies = ("keep", "reset")
    default_slots = "keep"
    allow_slot_targets = True

    def check(self, spec) -> None:
        """Extra, op-specific parameter checks at load time (raise RecipeError)."""

    def validate_params(self, kwargs: dict, where) -> dict:
        """Fill defaults, reject unknown or missing parameters; returns the full dict."""
        allowed = dict(self.params) | {"select": "*", "slots": self.default_slots, "again": False}
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise RecipeError(f"{where}: op {self.name!r}: unknown parameter {unknown[0]!r}; "
                              f"parameters: {', '.join(sorted(allowed))}")
        out = {k: kwargs.get(k, v) for k, v in allowed.items()}
        missing = [k for k, v in out.items() if v is REQUIRED]
        if missing:
            raise RecipeError(f"{where}: op {self.name!r}: missing required parameter {missing[0]!r}")
        if out["slots"] not in self.slot_policies:
            raise RecipeError(f"{where}: op {self.name!r}: slot policy {out['slots']!r} is not "
                              f"available; choose one of {', '.join(self.slot_policies)}")
        return out

    def plan(self, spec, ctx) -> list:
        """Steps for every selected tensor (elementwise ops: shape and dtype unchanged)."""
        return [self.step(spec, ctx, e) for e in ctx.select(spec)]

    def step(self, spec, ctx, e, **kw) -> Step:
        detail = tuple(sorted(self.detail(spec, e, ctx).items()))
        base = dict(op=self.name, where=str(spec.where), target=e.name, shape=e.shape,
                    dtype=e.dtype, new_dtype=e.dtype, detail=detail,
                    slots=ctx.slot_actions(e, spec.get("slots")), op_index=ctx.op_index)
        base.update(kw)
        return Step(**base)

    def detail(self, spec, entry, ctx) -> dict:
        """JSON-able parameters shown in the plan for one step."""
        skip = {"select", "slots", "again"}
        return {k: v for k, v in spec.params if k not in skip and not hasattr(v, "to_json")}

    def apply(self, step: Step, value: np.ndarray, ctx) -> Result:
        raise NotImplementedError


def float_value(arr: np.ndarray) -> np.ndarray:
    """Compute in float32 (or float64 for float64 inputs), whatever the stored dtype."""
    return arr.astype(np.float64 if arr.dtype == np.float64 else np.float32)


def like(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """``new`` cast back to ``old``'s dtype."""
    return np.asarray(new).astype(old.dtype, copy=False)


def check_number(spec, key, positive=False, lo=None, hi=None, allow_none=False):
    v = spec.get(key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RecipeError(f"{spec.where}: op {spec.op!r}: {key} must be a number, got {v!r}")
    if positive and v <= 0:
        raise RecipeError(f"{spec.where}: op {spec.op!r}: {key} must be > 0, got {v!r}")
    if lo is not None and v < lo or hi is not None and v > hi:
        raise RecipeError(f"{spec.where}: op {spec.op!r}: {key} must be in [{lo}, {hi}], got {v!r}")
