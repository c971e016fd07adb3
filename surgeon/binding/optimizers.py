"""Optimizer variable layouts (Keras 3): which slots each optimizer keeps, in what order.

A layout is a list of *groups*; each group lists slot names that are interleaved per
trainable variable. Groups follow each other. Example: Adam with amsgrad is
``[["momentum", "velocity"], ["velocity_hat"]]`` -> m0 v0 m1 v1 ... vh0 vh1 ...
RMSprop with momentum is ``[["velocity"], ["momentum"]]`` (all velocities, then all
momentums). Checked against ``optimizer.variables`` of the installed Keras (tests).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Optimizer class name -> storage name stem (Keras snake-cases the class name).
_STEMS = {
    "Adam": "adam", "AdamW": "adam_w", "SGD": "sgd", "RMSprop": "rm_sprop",
    "Adagrad": "adagrad", "Adadelta": "adadelta", "Adamax": "adamax", "Nadam": "nadam",
    "Ftrl": "ftrl", "Lion": "lion", "Lamb": "lamb", "Adafactor": "adafactor",
}
_CLASS_BY_STEM = {v: k for k, v in _STEMS.items()}


@dataclass(frozen=True)
class Layout:
    """One concrete optimizer variable layout."""

    class_name: str
    groups: tuple  # tuple of tuples of slot names
    trailing: tuple = ()  # optimizer-global variables after the slots (Nadam: u_product)
    variant: str = ""

    @property
    def slots(self) -> tuple:
        return tuple(s for g in self.groups for s in g)

    def slot_shape(self, slot, shape) -> tuple:
        """A slot's shape for a param of ``shape``: the param's, except Adafactor's
        factored second moments (``r``: rows, ``c``: columns of the last two dims; a
        scalar placeholder for params with fewer than two dims)."""
        shape = tuple(shape)
        if self.class_name == "Adafactor" and slot in ("r", "c"):
            if len(shape) < 2:
                return ()
            return shape[:-1] if slot == "r" else shape[:-2] + shape[-1:]
        return shape

    def order(self, params):
        """(param, slot) pairs in storage order for ``params`` (a list of param names)."""
        out = []
        for group in self.groups:
            for p in params:
                for s in group:
                    out.append((p, s))
        return out


def _truthy(cfg, key, default=False):
    v = cfg.get(key, default)
    return bool(v) if not isinstance(v, (int, float)) else v != 0


def layout_for(class_name: str, config: dict) -> Layout | None:
    """The exact layout for an optimizer config (from a ``.keras`` compile config).

    Keras' base optimizer builds the EMA copies (``use_ema``: slot ``average``) and the
    gradient accumulators (``gradient_accumulation_steps``) before the class's own slots.
    """
    base = _layout_for(class_name, config)
    c = config or {}
    prefix = (("average",),) if _truthy(c, "use_ema") else ()
    if c.get("gradient_accumulation_steps"):
        prefix += (("gradient_accumulator",),)
    if base is None or not prefix:
        return base
    return Layout(base.class_name, prefix + base.groups, base.trailing,
                  "+".join(filter(None, [base.variant, *(g[0] for g in prefix)])))


def accumulation_steps(config: dict) -> int:
    """``gradient_accumulation_steps`` (1 without accumulation): Keras' ``iterations`` is
    the stored counter divided by it."""
    return int((config or {}).get("gradient_accumulation_steps") or 1)


def _layout_for(class_name: str, config: dict) -> Layout | None:
    c = config or {}
    if class_name in ("Adam", "AdamW"):
        groups = [("momentum", "velocity")]
        if _truthy(c, "amsgrad"):
            groups.append(("velocity_hat",))
        return Layout(class_name, tuple(groups), variant="amsgrad" if len(groups) > 1 else "")
    if class_name == "Nadam":
        return Layout(class_name, (("momentum", "velocity"),), trailing=("u_product",))
    if class_name == "Lamb":
        return Layout(class_name, (("momentum", "velocity"),))
    if class_name == "Adamax":
        return Layout(class_name, (("momentum", "norm"),))
    if class_name == "SGD":
        groups = (("momentum",),) if _truthy(c, "momentum") else ()
        return Layout(class_name, groups, variant="momentum" if groups else "")
    if class_name == "RMSprop":
        groups = [("velocity",)]
        if _truthy(c, "momentum"):
            groups.append(("momentum",))
        if _truthy(c, "centered"):
            groups.append(("average_gradient",))
        return Layout(class_name, tuple(groups))
    if class_name == "Adagrad":
        return Layout(class_name, (("accumulator",),))
    if class_name == "Adadelta":
        return Layout(class_name, (("accumulated_grad", "accumulated_delta_var"),))
    if class_name == "Ftrl":
        return Layout(class_name, (("accumulator", "linear"),))
    if class_name == "Lion":
        return Layout(class_name, (("momentum",),))
    if class_name == "Adafactor":  # per param: factored r, c (see Layout.slot_shape), velocity
        return Layout(class_name, (("r", "c", "velocity"),))
    return None


def candidate_layouts(storage_name: str) -> list[Layout]:
    """Every layout an optimizer stored under ``storage_name`` (e.g. ``rm_sprop_1``) may use."""
    cls = class_from_storage_name(storage_name)
    if cls is None:
        return []
    variants = {
        "Adam": [{}, {"amsgrad": True}], "AdamW": [{}, {"amsgrad": True}],
        "SGD": [{}, {"momentum": 0.9}],
        "RMSprop": [{}, {"momentum": 0.9}, {"centered": True},
                    {"momentum": 0.9, "centered": True}],
    }.get(cls, [{}])
    return [layout_for(cls, v) for v in variants]


def class_from_storage_name(storage_name: str) -> str | None:
    """``adam_w_2`` -> ``AdamW``; None when unknown."""
    stem = storage_name
    while stem not in _CLASS_BY_STEM:
        m = re.match(r"^(.*)_\d+$", stem)
        if not m:
            return None
        stem = m.group(1)
    return _CLASS_BY_STEM[stem]


# -- zeroed second moments ------------------------------------------------------------------
# Optimizers with Adam's bias correction; the ratio below is the one rule that both
# ``apply`` (plan warning) and ``audit`` (moments-reset) use.
ADAM_LIKE = ("Adam", "AdamW", "Nadam", "Lamb", "Adamax")
RESET_RATIO_LIMIT = 2.0


def adam_first_step_ratio(t: int, beta_1=0.9, beta_2=0.999) -> float:
    """How large Adam's first update after zeroed slots is, relative to a settled one."""
    t = max(1, t)
    m_hat = (1 - beta_1) / (1 - beta_1 ** t)
    v_hat = (1 - beta_2) / (1 - beta_2 ** t)
    return m_hat / math.sqrt(v_hat)


def reset_step_ratio(class_name, config, iteration) -> float | None:
    """First update after zeroed second moments / a settled update, at stored ``iteration``.

    None when surgeon has no model of the optimizer's correction (callers then fall back to
    an iteration threshold).
    """
    if class_name not in ADAM_LIKE or iteration is None:
        return None
    cfg = config or {}
    return adam_first_step_ratio(int(iteration) + 1, float(cfg.get("beta_1", 0.9)),
                                 float(cfg.get("beta_2", 0.999)))
