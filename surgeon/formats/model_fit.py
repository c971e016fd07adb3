"""Does a ``--model`` fit the bare weights file it is given for? (names, counts, shapes)

A model file that does not fit would bind nothing and silently show every tensor with
no optimizer state; every command that takes ``--model`` (ls, diff, audit, apply,
convert, resume) refuses it instead, naming the first mismatch.

With a ``.keras`` model the check is exact: its own weights give every name and shape.
With a ``config.json`` the layer names, each known layer's number of variables and the
shapes its config fixes (units, filters, kernel size, embedding size) are checked.
"""
from __future__ import annotations

from pathlib import Path

from surgeon.binding import layers
from surgeon.core.errors import SurgeonError

# Layers whose variable count and output shape follow from the config alone.
_COUNTED = {"Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
            "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D",
            "SeparableConv2D", "Embedding", "BatchNormalization", "LayerNormalization"}
_WEIGHTED = set(layers._TRAINABLE) | set(layers._NON_TRAINABLE) | {
    "LSTM", "GRU", "SimpleRNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"}


def _plain(cfg) -> bool:
    """Not quantized, no LoRA: the textbook variable set."""
    policy = str((cfg or {}).get("dtype", ""))
    return not cfg.get("lora_rank") and "int8" not in policy and "float8" not in policy \
        and "int4" not in policy


def _expected_count(cls, cfg):
    if cls not in _COUNTED or cfg is None or not _plain(cfg):
        return None
    names = list(layers._TRAINABLE.get(cls, ()))
    for var, flag in layers._OPTIONAL.get(cls, ()):
        if not cfg.get(flag, True):
            names.remove(var)
    if "bias" in names and not cfg.get("use_bias", True):
        names.remove("bias")
    return len(names) + len(layers._NON_TRAINABLE.get(cls, ()))


def _shape_problem(obj, shapes):
    """A shape the layer's config contradicts, as text, or None."""
    cls, cfg = obj.cls, obj.config or {}
    if not shapes or not _plain(cfg):
        return None
    k = shapes[0]
    if cls == "Dense" and "units" in cfg and (len(k) != 2 or k[-1] != cfg["units"]):
        return f"kernel {list(k)}, but the model's Dense has units={cfg['units']}"
    if cls in ("Conv1D", "Conv2D", "Conv3D") and "filters" in cfg:
        ks = list(cfg.get("kernel_size") or [])
        if k[-1] != cfg["filters"] or (ks and list(k[:len(ks)]) != ks):
            return (f"kernel {list(k)}, but the model's {cls} has filters={cfg['filters']}, "
                    f"kernel_size={ks}")
    if cls == "Embedding" and "input_dim" in cfg and tuple(k) != (cfg["input_dim"], cfg.get("output_dim")):
        return (f"embeddings {list(k)}, but the model's Embedding has input_dim="
                f"{cfg['input_dim']}, output_dim={cfg.get('output_dim')}")
    return None


def _layer_names(obj):
    cfg = obj.config or {}
    if obj.cls not in layers.MODEL_CLASSES:
        return None
    return {(item.get("config") or {}).get("name", item.get("name")): item.get("class_name")
            for item in cfg.get("layers", []) if isinstance(item, dict)}


def config_problem(obj, h5) -> str | None:
    """The first way the object tree (built with the model config) contradicts the file."""
    names = _layer_names(obj)
    if names is not None:
        kids = {c.canon.rsplit("/", 1)[-1] for c in obj.children}
        for c in obj.children:
            kname = c.canon.rsplit("/", 1)[-1]
            if kname not in names:
                return f"the weights hold a layer {c.canon!r} that the model does not have"
        for name, cls in names.items():
            if cls in _WEIGHTED and name not in kids:
                where = f"{obj.canon}/{name}" if obj.canon else name
                return f"the model's layer {where!r} ({cls}) has no weights in the file"
    n = _expected_count(obj.cls, obj.config)
    if n is not None and n != len(obj.var_keys):
        return (f"layer {obj.canon!r}: {len(obj.var_keys)} variable(s) in the file, the "
                f"model's {obj.cls} has {n}")
    if obj.var_keys:
        bad = _shape_problem(obj, [tuple(h5[k].shape) for k in obj.var_keys])
        if bad:
            return f"layer {obj.canon!r}: {bad}"
    for c in obj.children:
        p = config_problem(c, h5)
        if p:
            return p
    return None


def reference_problem(reader, model) -> str | None:
    """First difference between ``reader``'s weights and those of the ``.keras`` ``model``."""
    from .keras_zip import KerasZipReader
    with KerasZipReader(model) as ref:
        want = {e.name: e.shape for e in ref.entries() if e.role in ("param", "state")}
    got = {e.name: e.shape for e in reader.entries() if e.role in ("param", "state")}
    for name, shape in got.items():
        if name not in want:
            return f"the weights hold {name} {list(shape)}, which the model does not have"
        if want[name] != shape:
            return f"{name} is {list(shape)} in the weights but {list(want[name])} in the model"
    for name, shape in want.items():
        if name not in got:
            return f"the model's {name} {list(shape)} is not in the weights"
    return None


def check(reader, model, objects=None) -> None:
    """Raise when ``model`` (the ``--model`` path) does not fit ``reader``'s weights."""
    if model is None:
        return
    problem = config_problem(objects, reader._root) if objects is not None else None
    if problem is None and Path(str(model)).suffix == ".keras":
        problem = reference_problem(reader, model)
    if problem:
        raise SurgeonError(f"{reader.label}: --model {model} does not fit these weights: "
                           f"{problem}")


def legacy_problem(reader, model_config) -> str | None:
    """The same checks for a legacy H5 weights file: names, counts, config-fixed shapes."""
    from types import SimpleNamespace

    from .legacy_h5 import model_layers
    configs = {n: (c, k) for n, c, k in model_layers(model_config)}
    stored = {}
    for e in reader.entries():
        if e.role in ("param", "state"):
            stored.setdefault(e.layer, []).append(e.shape)
    for name, shapes in stored.items():
        if name not in configs:
            return f"the weights hold a layer {name!r} that the model does not have"
        cls, cfg = configs[name]
        n = _expected_count(cls, cfg)
        if n is not None and n != len(shapes):
            return f"layer {name!r}: {len(shapes)} variable(s) in the file, the model's {cls} has {n}"
        bad = _shape_problem(SimpleNamespace(cls=cls, config=cfg), shapes)
        if bad:
            return f"layer {name!r}: {bad}"
    for name, (cls, _) in configs.items():
        if cls in _WEIGHTED and name not in stored:
            return f"the model's layer {name!r} ({cls}) has no weights in the file"
    return None


def check_legacy(reader, model) -> None:
    if model is None or getattr(reader, "_own_config", True):
        return  # the file's own config is used, --model is not
    problem = legacy_problem(reader, reader.model_config)
    if problem:
        raise SurgeonError(f"{reader.label}: --model {model} does not fit these weights: "
                           f"{problem}")
