"""transfer_backbone: start a 5-class model from a pretrained 3-class CNN.

    surgeon apply recipes/transfer_backbone.py          # writes out/transfer_backbone.keras
    surgeon ls out/transfer_backbone.keras

Input:  fixtures/recipe/cnn5_fresh.keras -- the fixtures' CNN with a fresh 5-class head
        (made by fixtures/make_recipe_fixtures.py; its Adam is built, iteration 0).
Source: fixtures/cnn_adam.keras -- the same backbone, trained, 3-class head.

Every backbone tensor (conv1, bn incl. moving stats, conv2, the frozen dense) is matched
by name and copied. The head's shapes differ (6x3 -> 6x5, 3 -> 5): ``on_mismatch="reinit"``
draws them fresh from the head's own initializers (glorot_uniform / zeros), seeded.
Slots are reset (the default): the new model starts its Adam state from zero at
iteration 0, so bias correction stays consistent. Run from the repository root.
"""
from surgeon.recipe import recipe, transfer

RECIPE = recipe(
    input="fixtures/recipe/cnn5_fresh.keras",
    output="out/transfer_backbone.keras",
    ops=[
        transfer("fixtures/cnn_adam.keras", on_mismatch="reinit", seed=0, slots="reset"),
    ],
)
