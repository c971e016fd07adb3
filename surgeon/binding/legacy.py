"""Bind the optimizer weights of legacy Keras H5 files to the params they belong to.

Each Keras generation named ``optimizer_weights`` differently (see FORMATS.md):

* Keras 2.0.x ``iterations:0``, ``Variable_N:0``: positional, blocked (all m, then all v);
  the params were the trainable weights **sorted by variable name** (Keras 2.0 sorted
  ``_collected_trainable_weights``; later versions keep the model's topological order).
* Keras 2.2.x ``Adam/iterations:0``, ``training/Adam/Variable_N:0``: positional, blocked
  (ms, vs, vhats; vhats are shape-(1,) placeholders when amsgrad is off).
* tf.keras 2.3-2.10 ``Adam/iter:0``, ``Adam/<layer>/<var>/m:0``: named per param.
* tf.keras 2.11+ ``iteration:0``, ``Adam/m/<layer>/<var>:0``: named per param.
* Keras 3's legacy writer ``adam/iteration``, ``adam/<path with _>_momentum``.

Named schemes are resolved by exact name lookup; positional ones by the optimizer's
block layout and a shape check of every slot. Anything that does not fit is reported as
unresolved with a note, never guessed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Legacy slot names -> Keras 3 slot names (class-specific overrides below).
SLOT_NAMES = {
    "m": "momentum", "v": "velocity", "vhat": "velocity_hat", "momentum": "momentum",
    "velocity": "velocity", "velocity_hat": "velocity_hat", "rms": "velocity",
    "mg": "average_gradient", "average_gradient": "average_gradient",
    "accumulator": "accumulator", "linear": "linear", "accum_grad": "accumulated_grad",
    "accum_var": "accumulated_delta_var", "accumulated_grad": "accumulated_grad",
    "accumulated_delta_var": "accumulated_delta_var", "u": "norm", "norm": "norm",
}
CLASS_SLOT_NAMES = {"Adamax": {"v": "norm"}}
KERAS3_SLOTS = ("velocity_hat", "accumulated_delta_var", "accumulated_grad",
                "average_gradient", "momentum", "velocity", "accumulator", "linear", "norm")
# Keras 2 positional blocks per optimizer class (one block = one slot for every param).
BLOCKS = {
    "Adam": ("momentum", "velocity", "velocity_hat"), "Nadam": ("momentum", "velocity"),
    "Adamax": ("momentum", "norm"), "SGD": ("momentum",), "RMSprop": ("velocity",),
    "Adagrad": ("accumulator",), "Adadelta": ("accumulated_grad", "accumulated_delta_var"),
}
_ITER = re.compile(r"^(iter|iterations|iteration)(_\d+)?$")
_POSITIONAL = re.compile(r"^(?:.*/)?Variable(_\d+)?$")


@dataclass
class Param:
    """A trainable weight as the legacy file names it."""

    name: str  # canonical name
    wname: str  # weight name in the file, e.g. ``dense_1/kernel:0``
    shape: tuple


@dataclass
class OptWeight:
    index: int
    wname: str
    shape: tuple


@dataclass
class LegacyBinding:
    scheme: str = "none"
    globals: dict = field(default_factory=dict)  # index -> global name
    slots: dict = field(default_factory=dict)  # index -> (param, slot)
    placeholders: list = field(default_factory=list)  # indices of unused (1,) vhats
    unresolved: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def strip_suffix(wname: str) -> str:
    """``dense_1/kernel:0`` -> ``dense_1/kernel``."""
    return re.sub(r":\d+$", "", wname)


def _slot_name(cls, legacy):
    return CLASS_SLOT_NAMES.get(cls, {}).get(legacy) or SLOT_NAMES.get(legacy)


def _global_name(n):
    leaf = n.rsplit("/", 1)[-1]
    if _ITER.match(leaf):
        return "iteration"
    if leaf in ("learning_rate", "lr"):
        return "learning_rate"
    if leaf in ("m_schedule", "u_product"):
        return leaf
    return None


def _by_name(w, cls, params_by_key, flat_keys):
    """(param, slot) for a named-scheme weight, or None."""
    n = strip_suffix(w.wname)
    parts = n.split("/")
    if len(parts) >= 3:
        # tf.keras 2.11+: <opt>/<slot>/<var path>
        key, slot = "/".join(parts[2:]), _slot_name(cls, parts[1])
        if key in params_by_key and slot:
            return params_by_key[key], slot
        # tf.keras 2.3-2.10: <opt>/<var path>/<slot>
        key, slot = "/".join(parts[1:-1]), _slot_name(cls, parts[-1])
        if key in params_by_key and slot:
            return params_by_key[key], slot
    if len(parts) == 2:
        # Keras 3 legacy writer: <opt>/<var path with _>_<slot>
        for slot in KERAS3_SLOTS:
            if parts[1].endswith("_" + slot):
                p = flat_keys.get(parts[1][: -len(slot) - 1])
                if p is not None:
                    return p, slot
    return None


MODEL_ORDER, NAME_ORDER = "model order", "order sorted by variable name"


def _known_order(keras_version):
    """The order a Keras version used, or None when not known for sure.

    Keras 2.0.x sorted ``_collected_trainable_weights`` by name (seen in the fer 2.0.5 file);
    Keras 2.2+ and tf.keras keep the model's topological order.
    """
    m = re.match(r"^(\d+)\.(\d+)", str(keras_version or ""))
    if not m:
        return None
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) == (2, 0):
        return NAME_ORDER
    return MODEL_ORDER if (major, minor) >= (2, 2) else None


def _plan(rest, order, blocks, k, amsgrad):
    """index -> (param, slot) (None for a vhat placeholder), or None if a shape differs."""
    n, plan = len(order), {}
    for j in range(k):
        for i, p in enumerate(order):
            w = rest[j * n + i]
            if blocks[j] == "velocity_hat" and not amsgrad and w.shape == (1,):
                plan[w.index] = None  # placeholder Keras 2.2 keeps when amsgrad is off
            elif w.shape != p.shape:
                return None
            else:
                plan[w.index] = (p.name, blocks[j])
    return plan


def _choose(plans, known, keras_version, b):
    """Pick the plan to use from {label: plan or None}; None when ambiguous or none fits."""
    if known and plans[known] is not None:
        return plans[known]
    fits = {label: p for label, p in plans.items() if p is not None}
    distinct = {tuple(sorted(p.items(), key=lambda kv: kv[0])) for p in fits.values()}
    if len(distinct) == 1:
        label = next(iter(fits))
        if known:
            b.notes.append(f"optimizer weights follow the {label}, not what Keras "
                           f"{keras_version} normally uses; bound by shape")
        return fits[label]
    if len(distinct) > 1:
        b.notes.append(f"ambiguous optimizer layout: Keras {keras_version} may list the slots in "
                       "model order or sorted by variable name, and both fit the shapes; "
                       "left unresolved")
    return None


def _bind_positional(b, rest, params, cls, config, keras_version):
    n = len(params)
    blocks = BLOCKS.get(cls)
    if not blocks or n == 0 or len(rest) % n:
        b.unresolved = [w.index for w in rest]
        b.notes.append(f"cannot bind {len(rest)} positional optimizer weights: optimizer "
                       f"{cls or 'unknown'} with {n} trainable weights has no known layout that fits")
        return
    k = len(rest) // n
    if k > len(blocks):
        b.unresolved = [w.index for w in rest]
        b.notes.append(f"{len(rest)} positional optimizer weights for {n} trainable weights: "
                       f"more than {cls} keeps ({len(blocks)} per weight)")
        return
    amsgrad = bool((config or {}).get("amsgrad", False))
    orders = {MODEL_ORDER: list(params), NAME_ORDER: sorted(params, key=lambda p: p.wname)}
    plans = {label: _plan(rest, order, blocks, k, amsgrad) for label, order in orders.items()}
    plan = _choose(plans, _known_order(keras_version), keras_version, b)
    if plan is None:
        b.unresolved = [w.index for w in rest]
        if not any("ambiguous" in note for note in b.notes):
            b.notes.append(f"{len(rest)} positional optimizer weights do not fit the {n} trainable "
                           "weights in model order or name order (shape mismatch); left unresolved")
        return
    for idx, v in plan.items():
        if v is None:
            b.placeholders.append(idx)
        else:
            b.slots[idx] = v


def bind(weights, params, cls, config, keras_version) -> LegacyBinding:
    """Bind legacy optimizer ``weights`` ([OptWeight]) to trainable ``params`` ([Param]).

    Args:
        weights: optimizer weights in the file's ``weight_names`` order.
        params: trainable (not frozen) params in the model's order.
        cls: optimizer class name from the training config (``Adam``), or None.
        config: optimizer config (for ``amsgrad``).
        keras_version: the file's ``keras_version`` attr.
    Returns:
        LegacyBinding: what each optimizer weight is.
    """
    b = LegacyBinding()
    params_by_key = {strip_suffix(p.wname): p for p in params}
    flat_keys = {strip_suffix(p.wname).replace("/", "_"): p for p in params}
    positional, named = [], 0
    for w in weights:
        n = strip_suffix(w.wname)
        hit = None if _POSITIONAL.match(n) else _by_name(w, cls, params_by_key, flat_keys)
        if hit is not None and hit[0].shape == w.shape:
            b.slots[w.index] = (hit[0].name, hit[1])
            named += 1
        elif hit is not None:
            b.unresolved.append(w.index)
            b.notes.append(f"optimizer weight {w.wname} has shape {w.shape} but its param "
                           f"{hit[0].name} has shape {hit[0].shape}; left unresolved")
        elif _global_name(n) and w.shape in ((), (1,)):
            b.globals[w.index] = _global_name(n)
        elif _POSITIONAL.match(n):
            positional.append(w)
        else:
            b.unresolved.append(w.index)
    if positional:
        b.scheme = "keras2-training" if positional[0].wname.startswith("training/") else "keras2"
        _bind_positional(b, positional, params, cls, config, keras_version)
    elif named:
        b.scheme = "named"
    if b.unresolved and not any("unresolved" in n for n in b.notes):
        b.notes.append(f"{len(b.unresolved)} optimizer weight(s) match no trainable weight "
                       "by name; left unresolved")
    _check_duplicates(b)
    return b


def _check_duplicates(b):
    seen = {}
    for idx, pair in list(b.slots.items()):
        if pair in seen:
            b.notes.append(f"two optimizer weights claim {pair[1]} of {pair[0]}; both left unresolved")
            for i in (idx, seen[pair]):
                b.slots.pop(i, None)
                b.unresolved.append(i)
        else:
            seen[pair] = idx
