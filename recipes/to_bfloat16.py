"""to_bfloat16: store every weight as bfloat16 (half the bytes), optimizer state untouched.

    surgeon apply recipes/to_bfloat16.py                # writes out/to_bfloat16.keras

Input: fixtures/cnn_adam.keras. Weights are rounded to bfloat16 and stored as Keras
stores bfloat16; the model config is unchanged, so Keras loads them into its float32
variables (the rounded values). Optimizer slots stay float32 (``slots="keep"``, as in
mixed-precision training); use ``slots="follow"`` to cast them too. Cast back with
``cast("*", dtype="float32")``.
"""
from surgeon.recipe import cast, recipe

RECIPE = recipe(
    input="fixtures/cnn_adam.keras",
    output="out/to_bfloat16.keras",
    ops=[
        cast("*", dtype="bfloat16", slots="keep"),
    ],
)
