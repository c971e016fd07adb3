"""adapt_input_channels: reuse an RGB-trained CNN for 1-channel (grayscale) images.

    surgeon apply recipes/adapt_input_channels.py       # writes out/adapt_input_channels.keras

Input:  fixtures/recipe/cnn_gray_fresh.keras -- the fixtures' CNN built for (8, 8, 1) inputs.
Source: fixtures/cnn_adam.keras -- trained on (8, 8, 3) inputs.

``conv1/kernel`` is 3x3x3x4 in the source and 3x3x1x4 in the target: as timm's
``adapt_input_conv`` does, the kernel is summed over its input channels (``"auto"``
picks sum for 1 channel, repeat-and-rescale by 3/C otherwise). Everything else is copied
by name. Slots reset, iteration 0 (the target's fresh optimizer).
"""
from surgeon.recipe import recipe, transfer

RECIPE = recipe(
    input="fixtures/recipe/cnn_gray_fresh.keras",
    output="out/adapt_input_channels.keras",
    ops=[
        transfer("fixtures/cnn_adam.keras", adapt_input_channels="auto", slots="reset"),
    ],
)
