"""surgeon: offline weight surgery on TensorFlow/Keras checkpoints, optimizer state included.

Public API (TensorFlow is imported only by the functions that need it):

- ``open_checkpoint(path, model=None)`` / ``open_writer(target, like)``: the canonical tree.
- ``load_recipe(path)`` and ``apply(recipe, dry_run=False)``: declarative edits.
- ``diff_checkpoints(a_reader, b_reader, ...)`` and ``audit_checkpoint(reader)``: what changed,
  is it healthy.
- ``convert_checkpoint(src, dst, like=None, optimizer="keep")``: between formats, optimizer
  state included.
- ``resume(checkpoint, data=..., steps=..., output=...)``: optimizer-consistent training.
"""
from surgeon.core import __version__
from surgeon.core.errors import SurgeonError
from surgeon.core.tree import Entry, OptimizerInfo
from surgeon.formats import detect, open_checkpoint, open_writer

__all__ = ["open_checkpoint", "open_writer", "detect", "Entry", "OptimizerInfo", "SurgeonError",
           "load_recipe", "apply", "diff_checkpoints", "audit_checkpoint", "convert_checkpoint", "resume",
           "make_executor"]

# public name -> (module, attribute); module names differ from function names on purpose
# (``surgeon.inspect.audit`` is a module, so the function is ``audit_checkpoint``).
_LAZY = {"load_recipe": ("recipe.loader", "load_recipe"), "apply": ("recipe.execute", "apply"),
         "diff_checkpoints": ("inspect.diff", "diff_checkpoints"),
         "audit_checkpoint": ("inspect.audit", "audit_checkpoint"),
         "convert_checkpoint": ("convert", "convert"), "resume": ("train", "resume"),
         "make_executor": ("recipe.executors", "make_executor")}


def __getattr__(name):
    """Import the heavier entry points on first use (``surgeon.resume`` pulls in TensorFlow)."""
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"surgeon.{module}"), attr)
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
