"""Keras 3 layer knowledge: variable names, which are trainable, sublayer order.

Keras stores a layer's variables as ``vars/0..n-1`` (trainable ones first, then the
non-trainable ones) without their names; these tables give them back. Layers not listed
get index names (``mylayer/0``) and are assumed trainable; binding then checks shapes.
"""
from __future__ import annotations

import re

_KERNEL_BIAS = ("kernel", "bias")
_RECURRENT = ("kernel", "recurrent_kernel", "bias")

# class -> trainable variable names (in creation order); non-trainable listed separately.
_TRAINABLE = {
    "Dense": _KERNEL_BIAS, "EinsumDense": _KERNEL_BIAS,
    "Conv1D": _KERNEL_BIAS, "Conv2D": _KERNEL_BIAS, "Conv3D": _KERNEL_BIAS,
    "Conv1DTranspose": _KERNEL_BIAS, "Conv2DTranspose": _KERNEL_BIAS,
    "Conv3DTranspose": _KERNEL_BIAS,
    "DepthwiseConv1D": _KERNEL_BIAS, "DepthwiseConv2D": _KERNEL_BIAS,
    "SeparableConv1D": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "SeparableConv2D": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "Embedding": ("embeddings",),
    "LSTMCell": _RECURRENT, "GRUCell": _RECURRENT, "SimpleRNNCell": _RECURRENT,
    "ConvLSTMCell": _RECURRENT,
    "PReLU": ("alpha",),
    "LayerNormalization": ("gamma", "beta"),
    "GroupNormalization": ("gamma", "beta"),
    "BatchNormalization": ("gamma", "beta"),
    "RMSNormalization": ("scale",),
}
_NON_TRAINABLE = {
    "BatchNormalization": ("moving_mean", "moving_variance"),
    "Normalization": ("mean", "variance", "count"),
}
# Layers whose optional trainable vars depend on config flags, with defaults.
_OPTIONAL = {
    "BatchNormalization": (("gamma", "scale"), ("beta", "center")),
    "LayerNormalization": (("gamma", "scale"), ("beta", "center")),
    "GroupNormalization": (("gamma", "scale"), ("beta", "center")),
}
_BIAS_FLAG = "use_bias"

# class -> {storage attribute: sublayer class or None (taken from config)}, in the order
# the layer tracks them (which is the order of its trainable variables).
SUBLAYERS = {
    "LSTM": (("cell", "LSTMCell"),), "GRU": (("cell", "GRUCell"),),
    "SimpleRNN": (("cell", "SimpleRNNCell"),),
    "ConvLSTM1D": (("cell", "ConvLSTMCell"),), "ConvLSTM2D": (("cell", "ConvLSTMCell"),),
    "ConvLSTM3D": (("cell", "ConvLSTMCell"),),
    "Bidirectional": (("forward_layer", None), ("backward_layer", None)),
    "TimeDistributed": (("layer", None),),
    "MultiHeadAttention": (("query_dense", "EinsumDense"), ("key_dense", "EinsumDense"),
                           ("value_dense", "EinsumDense"), ("output_dense", "EinsumDense")),
}
MODEL_CLASSES = ("Functional", "Sequential", "Model")


def to_snake_case(name: str) -> str:
    """Keras' own snake-casing of class names (``PReLU`` -> ``p_re_lu``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub(r"([a-z])([A-Z])", r"\1_\2", name)
    return name.lower()


_KNOWN = set(_TRAINABLE) | set(_NON_TRAINABLE) | set(SUBLAYERS) | set(MODEL_CLASSES) | {
    "InputLayer", "Dropout", "Flatten", "ReLU", "Activation", "Add", "Concatenate",
    "GlobalAveragePooling2D", "MaxPooling2D", "AveragePooling2D", "Reshape",
}
_BY_SNAKE = {to_snake_case(c): c for c in _KNOWN}


def class_from_storage(key: str) -> str | None:
    """Guess a layer class from its storage group (``conv2d_3`` -> ``Conv2D``)."""
    stem = key
    while stem not in _BY_SNAKE:
        m = re.match(r"^(.*)_\d+$", stem)
        if not m:
            return None
        stem = m.group(1)
    return _BY_SNAKE[stem]


def max_vars(class_name) -> int:
    """How many variables an unquantized layer of ``class_name`` stores at most."""
    return len(_TRAINABLE.get(class_name, ())) + len(_NON_TRAINABLE.get(class_name, ()))


def var_names(class_name: str | None, config: dict | None, n: int):
    """Names and trainability of a layer's ``n`` stored variables.

    Returns a list of ``(name, trainable, certain)``. ``certain`` is False when the
    names or trainability were guessed (unknown class or missing config).
    """
    cfg = config or {}
    trainable = list(_TRAINABLE.get(class_name, ()))
    non_trainable = list(_NON_TRAINABLE.get(class_name, ()))
    known = class_name in _TRAINABLE or class_name in _NON_TRAINABLE
    if not known:
        return [(str(i), True, False) for i in range(n)]
    certain = True
    for var, flag in _OPTIONAL.get(class_name, ()):
        if config is not None and not cfg.get(flag, True):
            trainable.remove(var)
    if "bias" in trainable and config is not None and not cfg.get(_BIAS_FLAG, True):
        trainable.remove("bias")
    names = trainable + non_trainable
    if len(names) != n:
        # Without config (or unexpected config), drop optional trailing trainables.
        certain = False
        while len(trainable) + len(non_trainable) > n and trainable:
            trainable.pop()
        names = trainable + non_trainable
        if len(names) != n:
            return [(str(i), True, False) for i in range(n)]
        if class_name not in _OPTIONAL and "bias" in _TRAINABLE.get(class_name, ()):
            certain = True  # only the bias can be missing: unambiguous
    return [(nm, nm in trainable, certain) for nm in names]


# -- dtype policies ---------------------------------------------------------------------
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def trainable_names(class_name: str | None) -> frozenset:
    """The variable names a layer of ``class_name`` creates trainable (empty: unknown class)."""
    return frozenset(_TRAINABLE.get(class_name, ()))


def _policy_dtype(policy):
    """The variable dtype of a Keras dtype policy (``mixed_*`` policies keep float32)."""
    if isinstance(policy, dict):
        policy = (policy.get("config") or {}).get("name")
    if not isinstance(policy, str):
        return None
    if policy.startswith("mixed_"):
        return "float32"
    return policy if policy in _FLOATS else None


def variable_dtypes(model_json) -> dict:
    """{canonical layer path: dtype of its variables} from the layers' dtype policies."""
    out = {}

    def visit(item, prefix):
        cfg = item.get("config") if isinstance(item, dict) else None
        if not isinstance(cfg, dict):
            return
        name = cfg.get("name") or item.get("name")
        path = f"{prefix}/{name}" if prefix and name else (name or prefix)
        dtype = _policy_dtype(cfg.get("dtype"))
        if dtype and path:
            out[path] = dtype
        for sub in cfg.get("layers") or []:
            visit(sub, path)

    for item in ((model_json or {}).get("config") or {}).get("layers") or []:
        visit(item, "")
    return out


def variable_dtype(dtypes, param):
    """The dtype of ``param``'s variable: its innermost layer with a known policy."""
    parts = param.split("/")[:-1]
    for i in range(len(parts), 0, -1):
        found = dtypes.get("/".join(parts[:i]))
        if found:
            return found
    return None
