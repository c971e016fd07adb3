"""Keras integration: in-training edits for ``model.fit`` and a clipping constraint.

``RecipeCallback`` runs surgeon ops (zero, rescale, clip, mask, noise, shrink_perturb)
*inside the compiled training step*: at ``on_train_begin`` it wraps the model's
``train_step`` so that, after ``optimizer.apply_gradients``, the ops assign the new values
to the variables with ``Variable.assign`` and apply each op's slot policy to the
optimizer's variables. Nothing goes through numpy, so it works inside ``tf.function``
(where ``get_weights()`` raises "numpy() is only available when eager execution is
enabled") and under ``tf.distribute`` (the edit runs in cross-replica context, every
replica gets the same value).

Importing this module imports Keras.
"""
from __future__ import annotations

from surgeon.core.tf import import_keras, import_tf
from surgeon.train.edits import EditProgram, as_edits
from surgeon.train.mapping import map_model

keras = import_keras()


class RecipeCallback(keras.callbacks.Callback):
    """Apply a recipe's ops every ``every_n_steps`` optimizer steps, inside the step.

    Args:
        recipe_or_ops: a recipe file path, a ``surgeon.recipe`` Recipe, a list of its op
            specs, or ``surgeon.train.edits`` objects (``Clip(min=-0.1, max=0.1)``, ...).
        every_n_steps: run the ops when ``optimizer.iterations % every_n_steps == 0``.
    Example:
        >>> from surgeon.train.edits import Mask, Clip
        >>> model.fit(ds, callbacks=[RecipeCallback([Mask(sparsity=0.5, select="head/kernel")],
        ...                                         every_n_steps=100)])
    """

    def __init__(self, recipe_or_ops, every_n_steps=1):
        super().__init__()
        self.edits = as_edits(recipe_or_ops)
        self.every = int(every_n_steps)
        self.program = None
        self._had_own_step = False

    def on_train_begin(self, logs=None):
        model = self.model
        self.program = EditProgram(self.edits, map_model(model), self.every)
        self._had_own_step = "train_step" in vars(model)
        original = model.train_step
        edit = self._in_graph_edit(model.optimizer, self.program, self.every)

        def train_step(data):
            out = original(data)
            tf = import_tf()
            ctx = tf.distribute.get_replica_context()
            if ctx is not None and tf.distribute.has_strategy():
                ctx.merge_call(lambda _strategy: edit())
            else:
                edit()
            return out

        model.train_step = train_step
        model.make_train_function(force=True)

    @staticmethod
    def _in_graph_edit(optimizer, program, every):
        tf = import_tf()

        def run():
            program.run(optimizer.iterations)
            return tf.constant(True)

        def edit():
            if every == 1:
                return run()
            due = tf.equal(tf.math.floormod(optimizer.iterations, every), 0)
            return tf.cond(due, run, lambda: tf.constant(False))

        return edit

    def on_train_end(self, logs=None):
        if not self._had_own_step and "train_step" in vars(self.model):
            del self.model.train_step
        self.model.make_train_function(force=True)


@keras.saving.register_keras_serializable(package="surgeon")
class ClipConstraint(keras.constraints.Constraint):
    """Elementwise clip to ``[min_value, max_value]``, applied by the optimizer after
    every update (``kernel_constraint=ClipConstraint(-0.1, 0.1)``): the constraint route
    for projections, inside the compiled step, with no ``assign`` inside ``call``."""

    def __init__(self, min_value=-1.0, max_value=1.0):
        self.min_value, self.max_value = float(min_value), float(max_value)

    def __call__(self, w):
        return keras.ops.clip(w, self.min_value, self.max_value)

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value}
