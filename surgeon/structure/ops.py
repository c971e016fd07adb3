"""Planners of the structural ops. Each returns a StructurePlan; nothing is written.

Slot policy ``follow`` (default) for widen (Net2WiderNet, a unit replicated c times):
at the function-preserving point, the gradient w.r.t. each copy of a consumer's incoming
weight equals the original gradient g (every copy sees the same input and the same
downstream error), so the consumer's rows copy their slots unchanged; the gradient
w.r.t. the replicated unit's own params (kernel column, bias, BatchNorm gamma/beta)
becomes g/c (its outgoing weights were divided by c), so first-moment slots are divided
by c and second-moment slots (velocity, accumulators) by c**2. ``reset`` zeroes the slots
of every touched tensor instead. Channel deletion slices slots exactly like the weights.
"""
from __future__ import annotations

import numpy as np

from surgeon.core.tf import import_keras_light
from surgeon.core.errors import SurgeonError
from surgeon.formats import open_checkpoint
from surgeon.binding.layers import to_snake_case
from . import kinds as K
from .channels import PRODUCERS, ChannelEdit
from .graph import Graph
from .plan import SLOT_POLICIES, StructurePlan, TensorAction


def _forbid_code(obj, label):
    if isinstance(obj, dict):
        if obj.get("class_name") in ("Lambda", "TFOpLambda"):
            raise SurgeonError(f"{label}: the model contains a Lambda layer; surgeon never runs "
                               "code from configs, so it cannot rebuild this model")
        for v in obj.values():
            _forbid_code(v, label)
    elif isinstance(obj, list):
        for v in obj:
            _forbid_code(v, label)


def load(path, inline=False):
    """(graph, entry names, compile_config) for a ``.keras`` source; ``inline``: nested
    models followed inside (channel edits)."""
    with open_checkpoint(path) as ck:
        if ck.format != "keras":
            raise SurgeonError(f"{path}: structural surgery needs a .keras model (config and "
                               f"weights together); this is a {ck.format} file")
        cfg = ck.config
        names = [e.name for e in ck.entries()]
    _forbid_code(cfg, str(path))
    return Graph(cfg, str(path), inline=inline), names, cfg.get("compile_config")


def _check_slots(slots):
    if slots not in SLOT_POLICIES:
        raise SurgeonError(f"slot policy {slots!r} is not available; choose one of "
                           f"{', '.join(SLOT_POLICIES)}")


def _plan(op, params, path, g, compile_config, slots, **kw):
    _check_slots(slots)
    return StructurePlan(op, params, str(path), g.to_json(), compile_config, slots=slots, **kw)


def _producer(g, name, op):
    layer = g.layer(name)
    if layer.role == "alias":
        raise SurgeonError(f"{g.label}: cannot {op} {name!r}: it is a nested model; name a layer "
                           f"inside it as {name}/<layer>")
    if layer.cls not in PRODUCERS:
        raise SurgeonError(f"{g.label}: cannot {op} {name!r}: it is a {layer.cls} layer; "
                           f"{op} supports {', '.join(PRODUCERS)}")
    return layer, K.width(g, layer)


def _channel_plan(op, params, path, g, names, cc, slots, edit, removed=()):
    actions, changed = edit.run()
    plan = _plan(op, params, path, g, cc, slots, changed_layers=changed, removed=list(removed))
    for a in actions:
        plan.add(a)
    return plan


def plan_widen(path, layer, to, seed=0, noise=0.0, slots="follow"):
    """Net2WiderNet: grow ``layer`` (a producer, see :mod:`.kinds`) to ``to`` units, function
    preserved. A layer of a nested model is named ``outer/inner``."""
    g, names, cc = load(path, inline=True)
    lay, width = _producer(g, layer, "widen")
    if not isinstance(to, int) or to <= width:
        raise SurgeonError(f"{path}: cannot widen {layer!r} to {to}: it already has {width} "
                           "units/filters; --to must be larger")
    if lay.config.get("activation") in ("softmax", "log_softmax"):
        raise SurgeonError(f"{path}: cannot widen {layer!r}: its {lay.config['activation']} "
                           "activation mixes units, so replicating units changes the function")
    rng = np.random.default_rng(seed)
    index = list(range(width)) + [int(i) for i in rng.integers(0, width, to - width)]
    counts = np.bincount(index, minlength=width)
    scale = [1.0 / counts[i] for i in index]
    edit = ChannelEdit(g, names, layer, index, consumer_scale=scale, slot_scale=scale,
                       verb="widen", function_preserving=True)
    params = {"layer": layer, "to": to, "seed": seed, "noise": noise}
    plan = _channel_plan("widen", params, path, g, names, cc, slots, edit)
    if noise:
        var, axis, blocks = K.score_specs(g, lay)[0]
        if blocks != 1 or lay.cls == "Bidirectional":
            raise SurgeonError(f"{path}: cannot widen {layer!r} with --noise: noise on the new "
                               f"units of a {lay.cls} layer is not supported; widen without it")
        plan.actions[var].steps.append(
            {"op": "noise", "std": float(noise), "relative": True, "axis": axis,
             "from": width, "seed": int(seed)})
        plan.notes.append(f"noise {noise} (relative) added to the new units: the function is "
                          "only approximately preserved")
    return plan


def plan_delete_channels(path, layer, channels, slots="follow", op="delete_channels", params=None):
    """Remove output ``channels`` of ``layer`` and the matching inputs downstream."""
    g, names, cc = load(path, inline=True)
    _, width = _producer(g, layer, "delete channels of")
    channels = sorted({int(c) for c in channels})
    bad = [c for c in channels if c < 0 or c >= width]
    if bad:
        raise SurgeonError(f"{path}: {layer!r} has {width} channels (0..{width - 1}); "
                           f"got channel {bad[0]}")
    if not channels or len(channels) >= width:
        raise SurgeonError(f"{path}: delete between 1 and {width - 1} channels of {layer!r}; "
                           f"got {len(channels)}")
    keep = [c for c in range(width) if c not in channels]
    edit = ChannelEdit(g, names, layer, keep, verb="delete channels of")
    params = params or {"layer": layer, "channels": channels}
    return _channel_plan(op, params, path, g, names, cc, slots, edit)


def channel_scores(path, layer, by="l1"):
    """Per-output-unit magnitude of ``layer``'s output weights (``l1``, ``l2``): the kernel's
    output axis (all gate blocks of a recurrent layer, both directions of a Bidirectional)."""
    if by not in ("l1", "l2"):
        raise SurgeonError(f"prune criterion {by!r} is not available; choose l1 or l2")
    g, _, _ = load(path, inline=True)
    lay, width = _producer(g, layer, "prune")
    total = np.zeros(width)
    with open_checkpoint(path) as ck:
        for var, axis, blocks in K.score_specs(g, lay):
            k = np.moveaxis(ck.read(var).astype(np.float64), axis, -1)
            flat = k.reshape(-1, blocks, width)
            total += np.abs(flat).sum((0, 1)) if by == "l1" else (flat ** 2).sum((0, 1))
    return total if by == "l1" else np.sqrt(total)


def plan_prune_channels(path, layer, fraction, by="l1", slots="follow"):
    """Delete the ``fraction`` of ``layer``'s channels with the smallest kernel norm."""
    g, _, _ = load(path, inline=True)
    _, width = _producer(g, layer, "prune")
    if not 0 < fraction < 1:
        raise SurgeonError(f"--fraction must be in (0, 1), got {fraction}")
    n = int(round(fraction * width))
    if n < 1 or n >= width:
        raise SurgeonError(f"{path}: pruning {fraction} of {width} channels of {layer!r} removes "
                           f"{n}; choose a fraction that removes between 1 and {width - 1}")
    scores = channel_scores(path, layer, by)
    drop = sorted(int(i) for i in np.argsort(scores, kind="stable")[:n])
    params = {"layer": layer, "fraction": fraction, "by": by, "channels": drop}
    return plan_delete_channels(path, layer, drop, slots, op="prune_channels", params=params)


def _non_negative(layer) -> bool:
    cfg = layer.config
    if layer.cls == "ReLU":
        return not cfg.get("negative_slope") and not cfg.get("threshold")
    return cfg.get("activation") in ("relu", "relu6", "sigmoid", "softplus")


def _shape_of(g, name, path):
    shape = g.out_shape(name)
    if shape is None:
        from .shapes import keras_output_shapes
        shape = keras_output_shapes(g.json, path).get(name)
    if shape is None or shape[-1] is None:
        raise SurgeonError(f"{path}: the output shape of {name!r} is unknown")
    return tuple(shape)


def plan_deepen(path, after, activation="auto", kernel_size=3, name=None, slots="follow"):
    """Net2DeeperNet: insert an identity Dense/Conv after ``after`` (function preserved)."""
    g, names, cc = load(path)
    anchor = g.layer(after)
    if anchor.shared:
        raise SurgeonError(f"{path}: cannot deepen after {after!r}: the layer is shared")
    g.refuse_output(after, "deepen after")
    shape = _shape_of(g, after, path)
    rank = len(shape)
    cls = {2: "Dense", 3: "Conv1D", 4: "Conv2D", 5: "Conv3D"}.get(rank)
    if cls is None:
        raise SurgeonError(f"{path}: cannot deepen after {after!r}: its output has rank {rank}; "
                           "supported: rank 2 (Dense), 3-5 (Conv1D/2D/3D)")
    nonneg = _non_negative(anchor)
    if activation == "auto":
        activation = "relu" if nonneg else "linear"
    if activation not in ("relu", "linear"):
        raise SurgeonError(f"deepen activation must be auto, relu or linear; got {activation!r}")
    if activation == "relu" and not nonneg:
        raise SurgeonError(f"{path}: cannot deepen after {after!r} with relu: its output can be "
                           "negative, so relu would change the function; use --activation linear")
    name = name or f"{after}_deep"
    cfg = {"name": name, "trainable": True, "activation": activation, "use_bias": True}
    if "dtype" in anchor.config:
        cfg["dtype"] = anchor.config["dtype"]
    if cls == "Dense":
        cfg["units"] = shape[-1]
    else:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise SurgeonError(f"--kernel-size must be odd and >= 1, got {kernel_size}")
        cfg.update(filters=shape[-1], kernel_size=[kernel_size] * (rank - 2), padding="same")
    item = {"module": "keras.layers", "class_name": cls, "config": cfg, "registered_name": None}
    g.insert_after(after, item)
    params = {"after": after, "activation": activation, "name": name, "layer_class": cls}
    if cls != "Dense":
        params["kernel_size"] = kernel_size
    plan = _plan("deepen", params, path, g, cc, slots, new_layers=[name])
    plan.add(TensorAction(f"{name}/kernel", None, init="identity", why="identity"))
    plan.add(TensorAction(f"{name}/bias", None, init="zeros", why="identity"))
    return plan


def unique_name(class_name, taken) -> str:
    """A fresh layer name as Keras makes one: the snake-cased class name, then ``_1``,
    ``_2``, ... (``Dense`` -> ``dense``, ``dense_1``), skipping names already ``taken``."""
    base = to_snake_case(class_name)
    n = 0
    name = base
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def _layer_item(spec, name, path, taken=None):
    if not isinstance(spec, dict) or not isinstance(spec.get("class_name"), str):
        raise SurgeonError(f'layer spec must be a JSON object {{"class_name": ..., "config": {{...}}}}; '
                           f"got {spec!r}")
    _forbid_code(spec, "layer spec")
    cfg = dict(spec.get("config") or {})
    cfg["name"] = name or cfg.get("name")
    if not cfg["name"] and taken is not None:
        cfg["name"] = unique_name(spec["class_name"], taken)
    if not cfg["name"]:
        raise SurgeonError("the new layer needs a name (--name or config.name)")
    if spec.get("module", "keras.layers") != "keras.layers" or spec.get("registered_name"):
        raise SurgeonError(f"{path}: only built-in keras.layers classes can be inserted; "
                           f"got {spec.get('module')}.{spec['class_name']}")
    return {"module": "keras.layers", "class_name": spec["class_name"], "config": cfg,
            "registered_name": None}


def _check_class(item):
    keras = import_keras_light()
    if not hasattr(keras.layers, item["class_name"]):
        raise SurgeonError(f"unknown Keras layer class {item['class_name']!r}")


def plan_insert_layer(path, after, spec, name=None, slots="follow"):
    """Insert a built-in layer (``spec``: {"class_name", "config"}) after ``after``; without
    ``name`` (or ``config.name``) it gets a fresh Keras-style name (``dropout``, ``dense_1``)."""
    g, names, cc = load(path)
    g.layer(after)
    g.refuse_output(after, "insert a layer after")  # before Keras is imported to check the class
    item = _layer_item(spec, name, path, taken=set(g.layers))
    _check_class(item)
    g.insert_after(after, item)
    params = {"after": after, "layer": item["class_name"], "name": item["config"]["name"]}
    plan = _plan("insert_layer", params, path, g, cc, slots, new_layers=[item["config"]["name"]])
    plan.notes.append("the new layer's weights use Keras' initialisers; its slots are zero")
    return plan


def plan_delete_layer(path, layer, slots="follow"):
    """Remove a single-input layer, connecting its consumers to its input."""
    g, names, cc = load(path)
    lay = g.layer(layer)
    if lay.inputs:
        before, after = lay.in_shapes[0], g.out_shape(layer)
        if before is not None and after is not None and tuple(before) != tuple(after):
            raise SurgeonError(f"{path}: cannot delete {layer!r}: its output shape {list(after)} "
                               f"differs from its input shape {list(before)}, so the layers after "
                               "it would not fit")
    g.remove(layer)
    removed = [n for n in names if n.startswith(layer + "/")]
    return _plan("delete_layer", {"layer": layer}, path, g, cc, slots, removed=removed)


def plan_replace_layer(path, layer, spec, name=None, slots="follow"):
    """Replace ``layer`` by a built-in layer; weights whose shapes still fit are kept."""
    g, names, cc = load(path)
    g.layer(layer)
    item = _layer_item(spec, name or layer, path)
    _check_class(item)
    g.replace(layer, item)
    new = item["config"]["name"]
    params = {"layer": layer, "with": item["class_name"], "name": new, "_inherit": {new: layer}}
    plan = _plan("replace_layer", params, path, g, cc, slots, changed_layers=[new])
    plan.notes.append(f"weights of {layer!r} are kept where the new layer has a weight of the same "
                      "name and shape (with their slots); others use Keras' initialisers")
    return plan
