"""The canonical checkpoint tree: format-independent entries with roles and slot links."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, asdict

ROLES = ("param", "state", "slot", "optimizer")


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, under its canonical name.

    ``role`` is one of ``param`` (trainable weight), ``state`` (non-trainable weight),
    ``slot`` (optimizer slot; ``slot_of`` names the param, ``slot`` the slot kind) or
    ``optimizer`` (optimizer-global such as ``iteration``). ``key`` is the storage key
    inside the file, ``layer`` the canonical layer path. ``frozen`` marks a param of a
    layer with ``trainable=False`` (Keras counts it as non-trainable; it has no slots).
    ``quant`` marks the quantized state of a quantized layer (``model.quantize(...)``):
    integer kernels, scales, zero points, amax histories; role ``state``, no slots.
    """

    name: str
    shape: tuple
    dtype: str
    role: str
    slot_of: str | None = None
    slot: str | None = None
    key: str = ""
    layer: str = ""
    frozen: bool = False
    quant: str = ""  # quantization mode of quantized state ("int8", "int4", "float8", "unknown")

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class OptimizerInfo:
    """What is known about the optimizer whose state a checkpoint holds."""

    name: str
    class_name: str | None = None
    config: dict = field(default_factory=dict)
    iterations: int | None = None
    learning_rate: float | None = None
    wrapper: str | None = None  # e.g. a LossScaleOptimizer around ``class_name``
    loss_scale: float | None = None
    # storage key -> other keys holding a copy of the same variable (written together)
    mirrors: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        d = {"name": self.name, "class_name": self.class_name,
             "iterations": self.iterations, "learning_rate": self.learning_rate}
        if self.wrapper:
            d |= {"wrapper": self.wrapper, "loss_scale": self.loss_scale}
        return d


METRICS = "metrics_variables"


def is_metric(entry) -> bool:
    """A compiled metric's variable (Orbax checkpoints hold them; ``.keras`` files do not)."""
    return entry.role == "state" and entry.layer == METRICS and entry.name.startswith(METRICS + "/")


def slot_name(param: str, slot: str) -> str:
    """Canonical name of a param's optimizer slot."""
    return f"optimizer/{param}/{slot}"


def select(entries, pattern: str | None = None, role: str | None = None):
    """Entries whose name matches a glob ``pattern`` (and ``role``, if given)."""
    out = []
    for e in entries:
        if pattern and not fnmatch.fnmatchcase(e.name, pattern):
            continue
        if role and e.role != role:
            continue
        out.append(e)
    return out


def slots_of(entries, param: str):
    """The slot entries bound to ``param``."""
    return [e for e in entries if e.role == "slot" and e.slot_of == param]
