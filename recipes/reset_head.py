"""reset_head: re-initialise the classifier head of a trained model, keep the rest.

    surgeon apply recipes/reset_head.py                 # writes out/reset_head.keras

Input: fixtures/cnn_adam.keras. ``head/kernel`` and ``head/bias`` are drawn fresh from the
initializers declared in the model's config (``initializer="default"``: glorot_uniform
and zeros here), seeded; their Adam slots are zeroed (``slots="reset"``). On a model
trained for many steps prefer ``slots="warm"``: surgeon warns when zeroed Adam slots meet
a large iteration counter (the first updates would be ~3x a normal step).
"""
from surgeon.recipe import recipe, reinit

RECIPE = recipe(
    input="fixtures/cnn_adam.keras",
    output="out/reset_head.keras",
    ops=[
        reinit("head/*", initializer="default", seed=0, slots="reset"),
    ],
)
