"""``zero``: set the selected tensors to zero.

Slot policies: keep | reset | warm. Default ``reset`` (a zeroed weight with its old
momentum would immediately move away again).
"""
from __future__ import annotations

import numpy as np

from .base import Op, Result


class Zero(Op):
    name = "zero"
    summary = "set tensors to zero"
    params = {}
    slot_policies = ("keep", "reset", "warm")
    default_slots = "reset"

    def apply(self, step, value, ctx):
        return Result(np.zeros_like(value))
