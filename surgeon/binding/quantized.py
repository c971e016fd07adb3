"""Quantized Keras 3 layers (``model.quantize("int8" | "int4" | "float8")``).

A quantized layer stores its variables in the order of its
``variable_serialization_spec`` (keras/src/layers/core/dense.py, einsum_dense.py,
embedding.py), not in the float layer's order, and most of them are not trainable:

* int8/int4: the integer kernel (int4: two values packed per int8), its scale, int4's
  zero point and group index are non-trainable; only the bias is a trainable param.
* float8: kernel and bias are trainable params; the scales and amax histories are
  marked trainable by Keras but overwritten with their "gradient" every step (no
  optimizer slots), so surgeon lists them as quantized state.

Quantized state gets role ``state`` and ``Entry.quant`` = the mode; ops refuse it (no
arithmetic on an integer kernel is exact), convert matches it only by name. A layout
surgeon does not know (gptq, awq, another class, unexpected variable count) is listed
by position with ``quant="unknown"``, never guessed.
"""
from __future__ import annotations

_F8 = ("inputs_scale", "inputs_amax_history", "kernel_scale", "kernel_amax_history",
       "outputs_grad_scale", "outputs_grad_amax_history")
_KERNEL = {
    "int8": ("kernel", "bias", "kernel_scale"),
    "int4": ("kernel", "bias", "kernel_scale", "kernel_zero", "g_idx"),
    "float8": ("kernel", "bias") + _F8,
}
SPECS = {
    "Dense": _KERNEL, "EinsumDense": _KERNEL,
    "Embedding": {"int8": ("embeddings", "embeddings_scale"),
                  "int4": ("embeddings", "embeddings_scale", "embeddings_zero", "g_idx")},
}
# Names whose presence (in a TF checkpoint, where no config is kept) marks a quantized layer.
STATE_NAMES = {"kernel_scale", "kernel_zero", "embeddings_scale", "embeddings_zero", "g_idx",
               *_F8}
# int4 sub-channel variables Keras saves only when they exist.
_OPTIONAL = ("kernel_zero", "embeddings_zero", "g_idx")
MODES = ("int8", "int4", "float8", "gptq", "awq")


def mode_of(config: dict | None) -> str | None:
    """The quantization mode of a layer config (its ``dtype`` policy), or None."""
    dtype = (config or {}).get("dtype")
    if isinstance(dtype, dict):
        cls = str(dtype.get("class_name", ""))
        mode = (dtype.get("config") or {}).get("mode")
        if mode:
            return str(mode).split("/")[0]  # "int4/128": int4 with block size 128
        if "Quantized" in cls or "GPTQ" in cls or "AWQ" in cls:
            return "unknown"
        return None
    if isinstance(dtype, str) and dtype.startswith(MODES):
        return dtype.split("_", 1)[0]
    return None


def names(class_name, config, mode, n):
    """``[(name, trainable, quant)]`` for a quantized layer's ``n`` stored variables, or
    None when its layout is not one surgeon knows exactly."""
    spec = SPECS.get(class_name, {}).get(mode)
    if spec is None:
        return None
    spec = [v for v in spec if v != "bias" or (config or {}).get("use_bias", True)]
    if len(spec) != n:
        spec = [v for v in spec if v not in _OPTIONAL]
    if len(spec) != n:
        return None
    out = []
    for v in spec:
        if mode == "float8" and v in ("kernel", "bias"):
            out.append((v, True, ""))
        elif v == "bias":
            out.append((v, True, ""))
        else:
            out.append((v, False, mode))
    return out


def is_unknown(entry) -> bool:
    """Quantized state of a layout surgeon does not know (named by position)."""
    quant = getattr(entry, "quant", "")
    return bool(quant) and (quant not in ("int8", "int4", "float8")
                            or entry.name.rsplit("/", 1)[-1].isdigit())


def unknown(n, mode):
    """Positional names for a quantized layer surgeon cannot name: all quantized state."""
    return [(str(i), False, mode or "unknown") for i in range(n)]


def mark_by_name(entries):
    """For formats without layer configs (TF checkpoints): mark the quantized state of
    layers that hold quantization variables (``kernel_scale``, ``g_idx``, ...)."""
    import dataclasses
    layers = {e.layer for e in entries if e.role in ("param", "state")
              and e.name.rsplit("/", 1)[-1] in STATE_NAMES}
    if not layers:
        return entries
    float8 = {e.layer for e in entries if e.layer in layers and e.name.endswith("amax_history")}
    out = []
    for e in entries:
        leaf = e.name.rsplit("/", 1)[-1]
        if e.layer in layers and e.role in ("param", "state") and (
                leaf in STATE_NAMES or not e.dtype.startswith(("float", "bfloat"))):
            mode = "float8" if e.layer in float8 else "int"
            e = dataclasses.replace(e, role="state", frozen=False, quant=mode)
        out.append(e)
    return out


def refusal(entry, what) -> str:
    """The one-line reason ``what`` cannot touch quantized ``entry``."""
    return (f"{entry.name} is {entry.quant}-quantized state of layer {entry.layer!r} "
            f"(model.quantize); {what} cannot be applied to it exactly; edit the float model "
            f"before quantizing, or select only the layer's float variables")
