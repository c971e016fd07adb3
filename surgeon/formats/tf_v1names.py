"""TF1 name-based checkpoints (``tf.compat.v1.train.Saver``): keys are variable names.

There is no object graph, so the variable names *are* the canonical names
(``scope/kernel``). Optimizer slots are variables named ``<var>/<Optimizer>[_k]``
(``fc1/kernel/Adam``, ``fc1/kernel/Adam_1``); ``beta1_power``, ``beta2_power`` and
``global_step`` are optimizer globals.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from surgeon.core.tree import Entry, OptimizerInfo, slot_name

# Variable names that are non-trainable state by convention (Keras and TF1 layers).
NON_TRAINABLE = {"moving_mean", "moving_variance", "mean", "variance", "count",
                 "seed_generator_state", "num_batches_tracked"}

# TF1 optimizer slot-variable stem -> (Keras class name, slot names by creation index).
V1_SLOTS = {
    "Adam": ("Adam", ("momentum", "velocity")),
    "Momentum": ("SGD", ("momentum",)),
    "Adagrad": ("Adagrad", ("accumulator",)),
    "Ftrl": ("Ftrl", ("accumulator", "linear")),
    "Adadelta": ("Adadelta", ("accumulated_grad", "accumulated_delta_var")),
    "RMSProp": ("RMSprop", ("velocity", "momentum")),
}
# RMSProp with centered=True creates rms, mg, momentum (RMSProp, RMSProp_1, RMSProp_2).
_RMS_CENTERED = ("velocity", "average_gradient", "momentum")
_GLOBALS = re.compile(r"^(?:.*/)?(beta1_power|beta2_power)(?:_\d+)?$")


@dataclass
class Mapping:
    """Canonical entries of a bundle and the storage keys behind each name."""

    entries: list = field(default_factory=list)
    aliases: dict = field(default_factory=dict)  # canonical name -> [storage keys]
    optimizer: OptimizerInfo | None = None
    notes: list = field(default_factory=list)

    def add(self, entry: Entry, keys):
        self.entries.append(entry)
        self.aliases[entry.name] = list(keys)


def _split_slot(key, keys):
    """(param key, stem, index) when ``key`` is ``<param>/<Stem>[_k]`` of another key."""
    if "/" not in key:
        return None
    parent, leaf = key.rsplit("/", 1)
    if parent not in keys:
        return None
    m = re.match(r"^(.*?)(?:_(\d+))?$", leaf)
    return parent, m.group(1), int(m.group(2) or 0)


def _slot_kind(stem, index, parent, keys):
    if stem == "RMSProp" and f"{parent}/RMSProp_2" in keys:
        table = _RMS_CENTERED
    else:
        table = V1_SLOTS.get(stem, (None, ()))[1]
    if index < len(table):
        return table[index]
    return stem.lower() + (f"_{index}" if index else "")


def map_names(keys: dict) -> Mapping:
    """Entries for a name-based checkpoint; ``keys`` maps key -> (shape, dtype)."""
    out = Mapping()
    slots, stems = {}, set()
    for key in keys:
        split = _split_slot(key, keys)
        if split:
            slots[key] = split
            stems.add(split[1])
    params = {p for p, _, _ in slots.values()}
    for key in sorted(keys, key=lambda k: (k in slots, k)):
        shape, dtype = keys[key]
        leaf = key.rsplit("/", 1)[-1]
        if key in slots:
            p, stem, idx = slots[key]
            kind = _slot_kind(stem, idx, p, keys)
            e = Entry(slot_name(p, kind), shape, dtype, "slot", slot_of=p, slot=kind, key=key,
                      layer=p.rsplit("/", 1)[0] if "/" in p else "")
        elif key == "global_step":
            e = Entry("optimizer/iteration", shape, dtype, "optimizer", key=key)
        elif _GLOBALS.match(key):
            e = Entry(f"optimizer/{key}", shape, dtype, "optimizer", key=key)
        else:
            role = "state" if leaf in NON_TRAINABLE or not dtype.startswith(
                ("float", "bfloat", "complex")) else "param"
            frozen = role == "param" and bool(params) and key not in params
            e = Entry(key, shape, dtype, role, key=key,
                      layer=key.rsplit("/", 1)[0] if "/" in key else "", frozen=frozen)
        out.add(e, [key])
    known = sorted(s for s in stems if s in V1_SLOTS)
    if stems or "global_step" in keys:
        cls = V1_SLOTS[known[0]][0] if len(known) == 1 else None
        out.optimizer = OptimizerInfo(name=known[0] if len(known) == 1 else "tf1", class_name=cls)
    unknown = sorted(stems - set(V1_SLOTS))
    if unknown:
        out.notes.append(f"slot variables with unknown optimizer suffix(es) {unknown} kept "
                         "under their TF1 names")
    return out
