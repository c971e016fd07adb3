"""``rename`` and ``delete``: change a checkpoint's structure.

A Keras 3 file's structure is fixed by its model config (variables are matched by
position under ``layers/<class>/vars/<i>``), so neither is possible there without
producing a file Keras cannot load: surgeon refuses at plan time and says what to do
instead (``transplant`` into a model that has the structure you want, or ``zero``).
"""
from __future__ import annotations

from surgeon.core.errors import RecipeError
from .base import Op

STRUCTURE_FIXED = ("keras", "keras-weights-h5", "keras-weights-sharded", "legacy-h5",
                   "saved-model")


class _Structural(Op):
    slot_policies = ("keep", "reset")
    advice = ""

    def plan(self, spec, ctx):
        ctx.select(spec)  # names must still resolve
        if ctx.reader.format in STRUCTURE_FIXED or not hasattr(ctx.writer_class, self.name):
            raise RecipeError(f"{spec.where}: op {self.name!r}: not possible for format "
                              f"{ctx.reader.format!r}: its structure is fixed by the model config, "
                              f"and Keras could not load the result; {self.advice}")
        return []


class Rename(_Structural):
    name = "rename"
    summary = "rename tensors (only formats whose structure is not fixed by a model config)"
    params = {"to": None}
    advice = "build the model with the new names and use transplant to move the weights"


class Delete(_Structural):
    name = "delete"
    summary = "delete tensors (only formats whose structure is not fixed by a model config)"
    params = {}
    advice = "use zero, or transplant the weights you keep into the smaller model"
