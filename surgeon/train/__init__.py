"""train: the training side -- resume training from a (possibly edited) checkpoint, optimizer
state included (``resume``), in-training edits (:mod:`~surgeon.train.edits`), the Keras
``RecipeCallback`` (:mod:`~surgeon.train.callback`, public as ``surgeon.keras``),
``tf.distribute`` set-up and LoRA on live models (:mod:`~surgeon.train.lora`: merge,
extract, ``load_lora``). The only package that imports TensorFlow/Keras eagerly (modules
import it on use). May import core, binding, formats, ops and recipe (to load a recipe's ops);
not inspect, convert or cli.

``resume()`` restores every weight, optimizer slot, the iteration counter and the learning
rate by canonical name, checks that checkpoint and model fit each other, trains with a
compiled custom loop and writes the result back through surgeon's writers.
"""
from .loop import ResumeResult, make_train_step, resume
from .restore import FitError, FitReport
from .edits import Clip, Edit, EditProgram, Mask, Noise, Rescale, ShrinkPerturb, Zero

__all__ = ["resume", "ResumeResult", "make_train_step", "FitError", "FitReport", "Edit",
           "EditProgram", "Zero", "Rescale", "Clip", "Mask", "Noise", "ShrinkPerturb"]
