"""shrink_perturb: warm-start a trained model the way Ash & Adams (2020) recommend.

    surgeon apply recipes/shrink_perturb.py             # writes out/shrink_perturb.keras

Input: fixtures/cnn_adam.keras. Every trainable weight becomes ``0.4 * w + 0.1 * eps``
with ``eps`` drawn from the weight's own initializer (seeded); BatchNorm moving
statistics (role ``state``) are left alone. The optimizer restarts: slots reset and the
iteration counter set to 0, as when training starts again on the grown data set.
The same recipe as TOML (no code executed): recipes/shrink_perturb.toml.
"""
from surgeon.recipe import recipe, select, shrink_perturb

RECIPE = recipe(
    input="fixtures/cnn_adam.keras",
    output="out/shrink_perturb.keras",
    iteration="reset",
    ops=[
        shrink_perturb(select("*", role="param"), shrink=0.4, perturb=0.1, seed=0, slots="reset"),
    ],
)
