"""``surgeon.keras``: the public path of the Keras integration (``RecipeCallback``,
``ClipConstraint``, ``load_lora``), which lives in :mod:`surgeon.train.callback`. Kept as a module because
``from surgeon.keras import RecipeCallback`` needs one; importing it imports Keras."""
from surgeon.train.callback import ClipConstraint, RecipeCallback
from surgeon.train.lora import load_lora

__all__ = ["RecipeCallback", "ClipConstraint", "load_lora"]
