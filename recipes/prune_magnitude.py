"""prune_magnitude: magnitude-prune every kernel to 50% sparsity, with a persistent mask.

    surgeon apply recipes/prune_magnitude.py            # writes out/prune_magnitude.keras

Input: fixtures/cnn_adam.keras. In each ``*/kernel`` the half of the elements with the
smallest magnitude is set to zero and their Adam slots are zeroed (``slots="reset"``).
The masks are stored in the file (``surgeon/masks/<name>`` in the weights H5; Keras
ignores them) and read back with ``surgeon.ops.mask.read_masks(path)``; ``surgeon resume``
honours them so pruned weights stay zero while training continues.
"""
from surgeon.recipe import recipe, mask

RECIPE = recipe(
    input="fixtures/cnn_adam.keras",
    output="out/prune_magnitude.keras",
    ops=[
        mask("*/kernel", sparsity=0.5, slots="reset"),
    ],
)
