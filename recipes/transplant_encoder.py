"""transplant_encoder: move a trained sub-model into another model under a new name.

    surgeon apply recipes/transplant_encoder.py         # writes out/transplant_encoder.keras
    # the one-line form:
    surgeon transplant fixtures/nested_adamw.keras fixtures/recipe/encoder_fresh.keras \\
        -o out/transplant_encoder_cli.keras --layers 'backbone/*=encoder/*' --iteration 3

Input:  fixtures/recipe/encoder_fresh.keras -- a model whose sub-model is named "encoder"
        (AdamW built, iteration 0), with a 3-output head.
Source: fixtures/nested_adamw.keras -- trained 3 steps, its sub-model is "backbone".

``backbone/fc1/*`` and ``backbone/fc2/*`` land in ``encoder/fc1/*`` and ``encoder/fc2/*``
with their AdamW slots (``slots="transplant"``, the default). The iteration counter is
set to the source's 3 so the transplanted moments keep their bias correction; the
untouched head's zero slots are unaffected by it.
"""
from surgeon.recipe import recipe, transplant

RECIPE = recipe(
    input="fixtures/recipe/encoder_fresh.keras",
    output="out/transplant_encoder.keras",
    iteration=3,
    ops=[
        transplant("fixtures/nested_adamw.keras", layers=["backbone/*=encoder/*"]),
    ],
)
