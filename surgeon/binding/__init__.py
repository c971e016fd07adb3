"""binding: which optimizer variable belongs to which param, and what a layer's variables are
called -- knowledge about Keras, not about files. :mod:`~surgeon.binding.keras3` binds Keras 3's
positional ``optimizer/vars/<i>`` through the trainable order, :mod:`~surgeon.binding.legacy`
the ``optimizer_weights`` of every older Keras generation, :mod:`~surgeon.binding.optimizers`
holds each optimizer's slot layout and :mod:`~surgeon.binding.layers` each layer's variable
names. Pure tables and functions over names and shapes: imports only :mod:`surgeon.core`.
"""
