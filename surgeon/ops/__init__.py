"""ops: the tensor ops a recipe can name -- one module per op (a small ``Op`` class in
:mod:`~surgeon.ops.base`: what it selects, how it maps a tensor and that tensor's optimizer
slots, with a documented slot policy), listed in the explicit static registry
:mod:`~surgeon.ops.registry` (``OPS``). Ops depend on the recipe's types
(:mod:`surgeon.recipe.schema`), never the reverse; they may import core, binding and formats
(``mask`` reads a mask file), and never the recipe engine, inspect, train or cli.
"""
