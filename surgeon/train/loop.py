"""``resume``: restore a checkpoint exactly and keep training it with a custom loop.

The step mirrors Keras' own ``train_step`` (forward with ``training=True``, the compiled
loss via ``model._compute_loss``, ``optimizer.scale_loss``, ``tf.GradientTape``,
``optimizer.apply_gradients``) inside one ``tf.function`` that also pulls the batch from
the iterator, so it is as fast as ``model.fit`` and bit-identical to it. Pruning masks
and in-training edits run in the same compiled function, in cross-replica context.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from surgeon.core.tf import import_keras, import_tf, tf_module
from surgeon.core.errors import SurgeonError


@dataclass
class ResumeResult:
    """What a resume did."""

    steps: int
    iteration_start: int
    iteration_end: int
    loss: float | None
    output: str | None
    checkpoints: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    report: dict = field(default_factory=dict)
    masks: list = field(default_factory=list)
    replicas: int = 1
    writer: str = "surgeon"
    model: object = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"steps": self.steps, "iteration_start": self.iteration_start,
                "iteration_end": self.iteration_end, "loss": self.loss, "output": self.output,
                "checkpoints": self.checkpoints, "seconds": round(self.seconds, 3),
                "steps_per_second": round(self.steps / self.seconds, 2) if self.seconds else None,
                "replicas": self.replicas, "masks": self.masks, "writer": self.writer,
                "restore": self.report}


def make_train_step(model, strategy, masks=None, program=None, jit_compile=False):
    """A compiled ``step(iterator, edit: bool) -> mean loss`` for ``model``."""
    tf = import_tf()
    unscale_loss_for_distribution = tf_module(
        "keras.src.losses.loss").unscale_loss_for_distribution
    unpack_x_y_sample_weight = import_keras().utils.unpack_x_y_sample_weight

    optimizer = model.optimizer
    tvars = model.trainable_variables
    compute_loss = getattr(model, "_compute_loss", None) or model.compute_loss

    def replica_step(data):
        x, y, sw = unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw, training=True)
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, tvars)
        if masks:
            grads = masks.mask_grads(grads)
        optimizer.apply_gradients(zip(grads, tvars))
        return unscale_loss_for_distribution(loss)

    def step(iterator, edit):
        per_replica = strategy.run(replica_step, args=(next(iterator),))
        loss = strategy.reduce("MEAN", per_replica, axis=None)
        if masks:
            masks.project()
        if edit and program is not None:
            program.run(optimizer.iterations)
        return loss

    return tf.function(step, reduce_retracing=True, jit_compile=jit_compile, autograph=False)


def _strategy(strategy):
    tf = import_tf()
    if strategy is None:
        return tf.distribute.get_strategy()
    if isinstance(strategy, str):
        from .distribute import make_strategy
        return make_strategy(strategy)
    return strategy


def _import_user_modules(model, data):
    """Import the ``--model``/``--data`` modules before the checkpoint is opened: the Keras
    classes they register (subclassed models, custom layers) let the reader name those
    variables as Keras does instead of by position."""
    from .data import load_callable
    for spec, what in ((model, "--model"), (data, "--data")):
        if isinstance(spec, str) and ":" in spec and not spec.endswith((".keras", ".json")):
            load_callable(spec, what)


def _prepare(checkpoint, model, strategy, custom_objects, allow_missing, reset_optimizer,
             seed, edits, edit_every, masks, data=None):
    keras = import_keras()
    from . import mapping, masks as masks_mod, restore
    from .edits import EditProgram, as_edits

    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    _import_user_modules(model, data)
    reader, kmodel = _open(checkpoint, model, strategy, custom_objects)
    try:
        with strategy.scope():
            vm = mapping.map_model(kmodel)
            rep = restore.restore(reader, vm, kmodel.optimizer, allow_missing, reset_optimizer)
            rep.notes += restore.finalize_layers(kmodel, reader)
            mask_arrays = masks_mod.read_masks(reader) if masks is not False else {}
            if isinstance(masks, dict):
                mask_arrays.update(masks)
            mset = masks_mod.MaskSet(mask_arrays, vm) if mask_arrays else None
            if mset:
                mset.project()  # a mask given here may not have been applied yet
        program = EditProgram(as_edits(edits), vm, edit_every) if edits else None
    except BaseException:
        reader.close()
        raise
    return reader, kmodel, vm, rep, mset, program


def _open(checkpoint, model, strategy, custom_objects):
    """(reader, compiled model). A ``module:function`` model is built first, so that a
    bare weights file is bound with that model's own config (exact slot binding)."""
    import json
    import os
    import tempfile
    keras = import_keras()
    from surgeon.formats import open_checkpoint
    from . import build
    if model is None or str(checkpoint).endswith(".keras") or _reader_model(checkpoint, model):
        reader = open_checkpoint(checkpoint, model=_reader_model(checkpoint, model))
        try:
            _refuse_unknown_quantization(reader)
            with strategy.scope():
                return reader, build.build_model(reader, model, custom_objects)
        except BaseException:
            reader.close()
            raise
    with strategy.scope():
        kmodel = build.build_model(None, model, custom_objects)
    fd, cfg = tempfile.mkstemp(prefix="surgeon-model-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(keras.saving.serialize_keras_object(kmodel), f)
        reader = open_checkpoint(checkpoint, model=cfg)
    finally:
        os.unlink(cfg)
    try:
        _refuse_unknown_quantization(reader)
    except BaseException:
        reader.close()
        raise
    return reader, kmodel


def _refuse_unknown_quantization(reader):
    """A quantized layout surgeon lists by position (gptq, awq, another class) cannot be
    restored by name: refuse before anything is built or trained."""
    from surgeon.binding.quantized import is_unknown
    odd = [e for e in reader.entries() if is_unknown(e)]
    if odd:
        raise SurgeonError(f"{reader.path}: {odd[0].name}: quantized layout ({odd[0].quant}) that "
                           f"surgeon lists by position only ({len(odd)} tensor(s)); resume cannot "
                           "restore it by name")


def _reader_model(checkpoint, model):
    """``--model`` for the reader: only a file helps it bind a bare weights file."""
    if model is None or str(checkpoint).endswith(".keras"):
        return None
    p = Path(str(model))
    return p if p.suffix in (".keras", ".json") and p.exists() else None


def _dataset(data, batch_size, seed, consumed, strategy):
    from .data import as_dataset, call_data_fn, load_callable, positioned
    if isinstance(data, str):
        data = call_data_fn(load_callable(data), seed)
    elif callable(data):
        data = call_data_fn(data, seed)
    ds = positioned(as_dataset(data, batch_size), consumed)
    if strategy.num_replicas_in_sync > 1 or _multiworker(strategy):
        ds = strategy.experimental_distribute_dataset(ds)
    return ds


def _target(output, iteration):
    """``output`` with ``{iteration}`` filled in (one file per save), else ``output``."""
    text = str(output)
    return text.replace("{iteration}", str(iteration)) if "{iteration}" in text else text


def _multiworker(strategy):
    return getattr(strategy, "cluster_resolver", None) is not None


def check_arguments(checkpoint, data, steps, output=None, model=None):
    """The checks that need no TensorFlow, done before importing it (mistakes fail fast),
    the output guard included."""
    from surgeon.formats import detect
    from .data import check_spec
    if steps < 0:
        raise SurgeonError(f"steps must be >= 0, got {steps}")
    detect(checkpoint)  # a missing or unknown checkpoint
    if isinstance(data, str):
        check_spec(data)
    if isinstance(model, (str, Path)) and Path(model).suffix in (".keras", ".json") \
            and not Path(model).exists():
        raise SurgeonError(f"--model {model}: no such file")
    if output is None or "://" in str(output):  # a kvstore URL: the Orbax writer checks it
        return
    out = Path(str(output))
    if "{iteration}" not in str(out.parent) and not out.parent.exists():
        raise SurgeonError(f"{out}: output directory {out.parent} does not exist")
    from . import checkpoint as ckpt
    ckpt.check_output(checkpoint, output, model)  # not an input; a format resume writes


def resume(checkpoint, *, data, steps, output=None, model=None, every=None, seed=None,
           allow_missing=False, reset_optimizer=False, batch_size=None, edits=None,
           edit_every=1, strategy=None, custom_objects=None, skip_consumed=True,
           jit_compile="auto", on_step=None, write=True, masks="auto"):
    """Restore ``checkpoint`` (weights, slots, iteration, learning rate) and train on.

    Args:
        checkpoint: any checkpoint surgeon reads (``.keras`` carries its own config).
        data: ``module:function`` (module may be a ``.py`` path), a callable or a
            ``tf.data.Dataset`` / ``(x, y)`` arrays. Batches already consumed (the
            checkpoint's iteration counter) are skipped unless ``skip_consumed=False``.
        steps: optimizer steps to run now.
        output: checkpoint to write (same format as the input); None writes nothing.
        model: ``.keras`` / ``config.json`` / ``module:function`` when the checkpoint has
            no config of its own (or to use a different one).
        every: also write ``output`` (atomically) every ``every`` steps; an output
            containing ``{iteration}`` keeps one file per save (``ck_{iteration}.keras``).
        seed: ``keras.utils.set_random_seed`` before building (fresh weights, dropout).
        allow_missing: fresh values for weights the checkpoint lacks, ignore extra ones.
        reset_optimizer: do not restore optimizer state; slots start from zero.
        edits: in-training ops (``surgeon.train.edits`` or recipe ops) run inside the
            compiled step every ``edit_every`` steps.
        strategy: a ``tf.distribute.Strategy`` or ``"mirrored"`` / ``"multiworker"``.
        on_step: ``f(step, total, loss_tensor)`` called after each step (progress).
        masks: ``"auto"`` honours pruning masks stored in the checkpoint; a dict
            ``{param: bool array}`` adds (or overrides) masks; ``False`` ignores them.
    Returns:
        ResumeResult. Raises FitError before any step when the checkpoint does not fit.
    Example:
        >>> resume("fixtures/cnn_adam.keras", data="recipes/example_data.py:cnn_data",
        ...        steps=5, output="/tmp/cnn_more.keras")
    """
    from . import checkpoint as ckpt
    check_arguments(checkpoint, data, steps, output if write else None, model)  # before any work
    args = {"checkpoint": str(checkpoint), "data": data, "steps": steps, "output": output,
            "model": model, "every": every, "seed": seed, "batch_size": batch_size,
            "allow_missing": allow_missing, "reset_optimizer": reset_optimizer,
            "strategy": strategy, "edits": len(edits) if edits else None}
    strategy = _strategy(strategy)
    reader, kmodel, vm, rep, mset, program = _prepare(
        checkpoint, model, strategy, custom_objects, allow_missing, reset_optimizer,
        seed, edits, edit_every, masks, data)
    try:
        return _train(reader, kmodel, vm, rep, mset, program, data, steps, output, every,
                      seed, batch_size, strategy, skip_consumed, jit_compile, on_step, write,
                      lambda it: ckpt.history(checkpoint, args, {"iteration": it}))
    finally:
        reader.close()


def _train(reader, kmodel, vm, rep, mset, program, data, steps, output, every, seed,
           batch_size, strategy, skip_consumed, jit_compile, on_step, write, log=lambda it: None):
    from . import checkpoint as ckpt
    from .distribute import is_chief
    start = int(kmodel.optimizer.iterations.numpy())
    if rep.reset_slots:
        start_data = int(((reader.metadata() or {}).get("optimizer") or {}).get("iterations") or 0)
    else:
        start_data = start
    ds = _dataset(data, batch_size, seed, start_data if skip_consumed else 0, strategy)
    jit = kmodel.jit_compile if jit_compile == "auto" else bool(jit_compile)
    step_fn = make_train_step(kmodel, strategy, mset, program, jit_compile=jit)
    like = ckpt.writable_like(reader, vm, kmodel.optimizer) and (
        not output or ckpt.same_format(reader, _target(output, start)))
    chief = is_chief(strategy)
    result = ResumeResult(steps, start, start, None, str(output) if output else None,
                          report=rep.to_json(), replicas=strategy.num_replicas_in_sync,
                          writer="surgeon" if like else "keras")
    if mset:
        result.masks = [v.path for v, _, _ in mset.bound]
    iterator = iter(ds)
    t0 = time.perf_counter()
    loss = None
    pending = None  # a save in progress: complete once its atomic rename has happened
    try:
        for i in range(steps):
            edit = program is not None and program.due(start + i + 1)
            loss = step_fn(iterator, edit)
            if on_step is not None:
                on_step(i + 1, steps, loss)
            if every and (i + 1) % every == 0 and i + 1 < steps and output and write and chief:
                pending = _target(output, start + i + 1)
                result.checkpoints.append(str(ckpt.save(reader, vm, kmodel, pending, like,
                                                        log(start + i + 1))))
                pending = None
    except KeyboardInterrupt as exc:  # the CLI names the last complete checkpoint
        exc.surgeon_checkpoints = list(result.checkpoints)
        if pending is not None and os.path.exists(pending):  # interrupted after the rename
            exc.surgeon_checkpoints.append(str(pending))
        raise
    if steps:  # what fit() does when training ends (use_ema: weights := their averages)
        with strategy.scope():
            kmodel.optimizer.finalize_variable_values(kmodel.trainable_weights)
    result.seconds = time.perf_counter() - t0
    result.loss = float(loss) if loss is not None else None
    result.iteration_end = int(kmodel.optimizer.iterations.numpy())
    if output and write and chief:
        result.checkpoints.append(str(ckpt.save(
            reader, vm, kmodel, _target(output, result.iteration_end), like,
            log(result.iteration_end))))
    result.model = kmodel
    return result
