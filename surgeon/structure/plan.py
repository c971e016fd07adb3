"""A structural edit as data: the new model config plus, per new tensor, where it comes from.

A ``TensorAction`` says how one tensor of the *new* model is made from the source
checkpoint: a source tensor (or none: ``init``), then a list of steps:

* ``take``  (axis, index)   -- gather along an axis (slice, reorder, replicate);
* ``scale`` (axis, factors) -- multiply along an axis; ``on`` says whether the param
  (``param``), its optimizer slots (``slots``) or both are scaled. A slot of kind k is
  scaled by ``factors ** power(k)`` (2 for second-moment slots such as Adam's velocity);
* ``noise`` (std, seed)     -- add Gaussian noise to the param (never to slots).

``init`` (for new tensors): ``identity`` (Dense eye / Conv centre-tap eye), ``zeros``, or
``keras`` (keep Keras' own initialiser from the skeleton). New tensors get zero slots.
The slot policy of a plan: ``follow`` (slots get the same takes and the slot scales) or
``reset`` (slots of every touched tensor are zero).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SLOT_POLICIES = ("follow", "reset")
SECOND_MOMENT = {"velocity", "velocity_hat", "accumulator", "accumulated_grad",
                 "accumulated_delta_var", "norm"}


def slot_power(kind: str) -> int:
    """How a slot scales with the gradient: 2 for squared-gradient statistics, else 1."""
    return 2 if kind in SECOND_MOMENT else 1


@dataclass
class TensorAction:
    """How one tensor of the new model is produced."""

    target: str
    source: str | None
    shape: tuple | None = None
    steps: list = field(default_factory=list)
    init: str | None = None
    why: str = ""

    def to_json(self) -> dict:
        steps = []
        for s in self.steps:
            d = dict(s)
            for k in ("index", "factors"):
                if k in d:
                    d[k] = [round(float(v), 8) if k == "factors" else int(v) for v in d[k]]
            steps.append(d)
        return {"target": self.target, "source": self.source,
                "shape": list(self.shape) if self.shape is not None else None,
                "init": self.init, "steps": steps, "why": self.why}

    def summary(self) -> str:
        if self.source is None:
            return f"{self.target}: new ({self.init or 'keras'} init){' -- ' + self.why if self.why else ''}"
        parts = []
        for s in self.steps:
            if s["op"] == "take":
                parts.append(f"take {len(s['index'])} along axis {s['axis']}")
            elif s["op"] == "scale":
                parts.append(f"scale axis {s['axis']} ({s['on']})")
            else:
                parts.append(f"noise std={s['std']}")
        src = "" if self.source == self.target else f" <- {self.source}"
        return f"{self.target}{src}: {', '.join(parts) or 'copy'}"


@dataclass
class StructurePlan:
    """Everything needed to write the edited model; printable and JSON-able."""

    op: str
    params: dict
    source_path: str
    config: dict                      # new model JSON (config.json without compile_config)
    compile_config: dict | None
    actions: dict = field(default_factory=dict)   # target -> TensorAction (touched/new only)
    removed: list = field(default_factory=list)   # source tensors with no place in the new model
    new_layers: list = field(default_factory=list)
    changed_layers: list = field(default_factory=list)
    slots: str = "follow"
    notes: list = field(default_factory=list)

    def add(self, action: TensorAction):
        self.actions[action.target] = action

    def to_json(self) -> dict:
        return {"op": self.op, "params": self.params, "source": self.source_path,
                "slots": self.slots, "new_layers": self.new_layers,
                "changed_layers": self.changed_layers, "removed": self.removed,
                "actions": [a.to_json() for a in self.actions.values()], "notes": self.notes}

    def text(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items() if not k.startswith("_"))
        lines = [f"{self.op}({args}) on {self.source_path}  [slots: {self.slots}]"]
        if self.new_layers:
            lines.append("  new layers: " + ", ".join(self.new_layers))
        if self.changed_layers:
            lines.append("  changed layers: " + ", ".join(self.changed_layers))
        for a in self.actions.values():
            lines.append("  " + a.summary())
        for r in self.removed:
            lines.append(f"  {r}: removed")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


def apply_steps(arr: np.ndarray, steps, slot_kind: str | None = None) -> np.ndarray:
    """Apply ``steps`` to a param (``slot_kind`` None) or to one of its slots."""
    out = np.asarray(arr)
    work = out.astype(np.float64) if out.dtype.kind == "f" else out
    for s in steps:
        if s["op"] == "take":
            work = np.take(work, np.asarray(s["index"], dtype=np.int64), axis=s["axis"])
        elif s["op"] == "scale":
            if slot_kind is None and s["on"] == "slots" or slot_kind is not None and s["on"] == "param":
                continue
            f = np.asarray(s["factors"], dtype=np.float64)
            if slot_kind is not None:
                f = f ** slot_power(slot_kind)
            shape = [1] * work.ndim
            shape[s["axis"]] = -1
            work = work * f.reshape(shape)
        elif s["op"] == "noise" and slot_kind is None:
            work = _noise(work, s)
    return work.astype(out.dtype) if out.dtype.kind == "f" else work


def _noise(work, s):
    """Gaussian noise (std relative to the tensor's std if ``relative``) on the units
    from index ``from`` along ``axis`` (the new units of a widened layer)."""
    rng = np.random.default_rng(s["seed"])
    std = s["std"] * (float(work.std()) if s.get("relative") else 1.0)
    axis = s.get("axis", -1) % work.ndim
    lo = s.get("from", 0)
    sl = [slice(None)] * work.ndim
    sl[axis] = slice(lo, None)
    work = work.copy()
    work[tuple(sl)] += rng.normal(0.0, std, size=work[tuple(sl)].shape)
    return work


def identity_init(shape) -> np.ndarray:
    """Identity kernel: Dense (n, n) eye; ConvND (k..., c, c) with eye at the centre tap."""
    shape = tuple(shape)
    out = np.zeros(shape, dtype=np.float32)
    if len(shape) == 2:
        out[:] = np.eye(shape[0], shape[1], dtype=np.float32)
        return out
    centre = tuple(k // 2 for k in shape[:-2])
    out[centre] = np.eye(shape[-2], shape[-1], dtype=np.float32)
    return out
