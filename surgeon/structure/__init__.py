"""structure: structural surgery on saved ``.keras`` models -- config, weights and optimizer
slots together (widen, deepen, delete/prune channels, insert/delete/replace a layer). A
library of whole-model rewrites that knows nothing of recipes: recipes reach it through
:mod:`surgeon.recipe.structural`, the CLI through :mod:`surgeon.cli.structure`. May import
core, binding and formats; nothing above.

Each op has a planner (``plan_*``: reads the config and entry names, returns a
:class:`StructurePlan`; nothing is written) and :func:`execute` writes a plan.

Example:
    >>> from surgeon import structure
    >>> plan = structure.plan_widen("fixtures/structure/mlp_adam.keras", "fc1", to=12)
    >>> structure.execute(plan, "/tmp/wide.keras")["output"]
    '/tmp/wide.keras'
"""
from .execute import execute
from .ops import (plan_deepen, plan_delete_channels, plan_delete_layer, plan_insert_layer,
                  plan_prune_channels, plan_replace_layer, plan_widen, channel_scores)
from .heads import head_scores, plan_delete_heads, plan_prune_heads
from .plan import SLOT_POLICIES, StructurePlan, TensorAction
from .channels import supported_kinds

PLANNERS = {
    "widen": plan_widen,
    "deepen": plan_deepen,
    "delete_channels": plan_delete_channels,
    "prune_channels": plan_prune_channels,
    "insert_layer": plan_insert_layer,
    "delete_layer": plan_delete_layer,
    "replace_layer": plan_replace_layer,
    "delete_heads": plan_delete_heads,
    "prune_heads": plan_prune_heads,
}

__all__ = ["execute", "PLANNERS", "StructurePlan", "TensorAction", "SLOT_POLICIES",
           "supported_kinds", "channel_scores", "head_scores"] + [f"plan_{k}" for k in PLANNERS]
