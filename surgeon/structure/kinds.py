"""Layer kinds of channel surgery: which weights of a layer follow a channel map, on which axis.

A channel map ``m = (index, consumer_scale, slot_scale)`` describes the channels a tensor
carries after an edit (new channel j is old channel ``index[j]``). Three roles:

* **producer** (the edited layer): its output weights are gathered by ``index`` (block-wise
  for the gate blocks of a recurrent layer) and their slots scaled by ``slot_scale``;
* **consumer**: its input rows are gathered by ``index`` and scaled by ``consumer_scale``
  (the pointwise half of a SeparableConv gathers ``index`` expanded by the depth multiplier;
  its depthwise half is per-channel);
* **per-channel** (followed through): its per-channel weights are gathered by ``index``,
  their slots scaled by ``slot_scale``; a DepthwiseConv with depth multiplier k expands the
  map (channel c becomes outputs c*k .. c*k+k-1).

Each spec is ``(variable path, axis, blocks, mult, mode)``: ``blocks`` gate blocks laid out
block-major along ``axis`` (LSTM 4, GRU 3), ``mult`` the depth multiplier (channel-major),
``mode`` ``out`` (gather + slot scale), ``in`` (gather + consumer scale on the param),
``chan`` (gather + slot scale, per-channel) or ``stat`` (gather only: a non-trainable
statistic such as BatchNormalization's moving mean).
"""
from __future__ import annotations

from surgeon.core.errors import SurgeonError

DENSE_CONV = ("Dense", "Conv1D", "Conv2D", "Conv3D")
TRANSPOSE = ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
SEPARABLE = ("SeparableConv1D", "SeparableConv2D")
DEPTHWISE = ("DepthwiseConv1D", "DepthwiseConv2D")
RNN = {"LSTM": ("lstm_cell", 4), "GRU": ("gru_cell", 3), "SimpleRNN": ("simple_rnn_cell", 1)}
RECURRENT = tuple(RNN) + ("Bidirectional",)
PRODUCERS = DENSE_CONV + TRANSPOSE + SEPARABLE + ("Embedding",) + RECURRENT
CONSUMERS = DENSE_CONV + TRANSPOSE + SEPARABLE + RECURRENT
# normalise across channels: followed by deletions, refused by function-preserving edits
ACROSS = ("LayerNormalization", "RMSNormalization", "UnitNormalization", "GroupNormalization")
PER_CHANNEL = ("BatchNormalization", "PReLU") + DEPTHWISE + ACROSS


def _refuse(g, verb, name, why):
    raise SurgeonError(f"{g.label}: cannot {verb} through {name!r}: {why}")


def rnn_parts(g, layer, verb="edit"):
    """[(variable prefix, RNN class, its config)]: one for LSTM/GRU/SimpleRNN, two for a
    Bidirectional wrapper (forward, backward)."""
    cfg = layer.config
    if layer.cls in RNN:
        if cfg.get("return_state") or cfg.get("stateful"):
            _refuse(g, verb, layer.name, "recurrent layers with return_state or stateful=True "
                    "are not supported")
        return [(f"{layer.name}/{RNN[layer.cls][0]}", layer.cls, cfg)]
    if cfg.get("merge_mode") not in ("concat", "sum", "ave", "mul"):
        _refuse(g, verb, layer.name, f"Bidirectional merge_mode {cfg.get('merge_mode')!r} "
                "is not supported (concat, sum, ave, mul are)")
    parts = []
    for key in ("layer", "backward_layer"):
        sub = cfg.get(key) or {}
        cls, sc = sub.get("class_name"), sub.get("config") or {}
        if cls not in RNN or sc.get("return_state") or sc.get("stateful"):
            _refuse(g, verb, layer.name, f"the wrapped {key.replace('_', ' ')} is a {cls} "
                    "(supported: LSTM, GRU, SimpleRNN without return_state/stateful)")
        parts.append((f"{layer.name}/{sc['name']}/{RNN[cls][0]}", cls, sc))
    return parts


def forget_build(layer):
    """Drop the recorded build shapes of a wrapper's inner layers (Keras would build them
    with the old width); the top-level ``build_config`` is dropped by the graph writer."""
    for key in ("layer", "backward_layer"):
        sub = layer.config.get(key)
        if isinstance(sub, dict):
            sub.pop("build_config", None)


def width(g, layer) -> int:
    if layer.cls in RECURRENT:
        return int(rnn_parts(g, layer)[0][2]["units"])
    if layer.cls == "Embedding":
        return int(layer.config["output_dim"])
    return int(layer.config["units" if layer.cls == "Dense" else "filters"])


def set_width(g, layer, n):
    if layer.cls in RECURRENT:
        for _, _, cfg in rnn_parts(g, layer):
            cfg["units"] = n
    elif layer.cls == "Embedding":
        layer.config["output_dim"] = n
    else:
        layer.config["units" if layer.cls == "Dense" else "filters"] = n


def out_specs(g, layer):
    """A producer's output weights (mode ``out``) and its own recurrent rows (``in``)."""
    n = layer.name
    if layer.cls in DENSE_CONV:
        return [(f"{n}/kernel", -1, 1, 1, "out"), (f"{n}/bias", 0, 1, 1, "out")]
    if layer.cls in TRANSPOSE:
        return [(f"{n}/kernel", -2, 1, 1, "out"), (f"{n}/bias", 0, 1, 1, "out")]
    if layer.cls in SEPARABLE:
        return [(f"{n}/pointwise_kernel", -1, 1, 1, "out"), (f"{n}/bias", 0, 1, 1, "out")]
    if layer.cls == "Embedding":
        return [(f"{n}/embeddings", -1, 1, 1, "out")]
    specs = []
    forget_build(layer)
    for prefix, cls, _ in rnn_parts(g, layer):
        gates = RNN[cls][1]
        specs += [(f"{prefix}/kernel", -1, gates, 1, "out"),
                  (f"{prefix}/recurrent_kernel", 0, 1, 1, "in"),
                  (f"{prefix}/recurrent_kernel", -1, gates, 1, "out"),
                  (f"{prefix}/bias", -1, gates, 1, "out")]
    return specs


def score_specs(g, layer):
    """(variable, axis, blocks) whose per-output-unit magnitude ranks a producer's units."""
    return [(v, ax, b) for v, ax, b, _, mode in out_specs(g, layer)
            if mode == "out" and not v.endswith("bias") and not v.endswith("recurrent_kernel")]


def in_specs(g, layer):
    """A consumer's input weights."""
    n, cfg = layer.name, layer.config
    if layer.cls in DENSE_CONV:
        return [(f"{n}/kernel", -2, 1, 1, "in")]
    if layer.cls in TRANSPOSE:
        return [(f"{n}/kernel", -1, 1, 1, "in")]
    if layer.cls in SEPARABLE:
        mult = int(cfg.get("depth_multiplier", 1))
        return [(f"{n}/depthwise_kernel", -2, 1, 1, "chan"),
                (f"{n}/pointwise_kernel", -2, 1, mult, "in")]
    forget_build(layer)
    return [(f"{prefix}/kernel", -2, 1, 1, "in") for prefix, _, _ in rnn_parts(g, layer)]


def chan_specs(layer):
    """A per-channel layer's weights and the depth multiplier of its output map."""
    n, cfg = layer.name, layer.config
    if layer.cls == "BatchNormalization":
        return [(f"{n}/{v}", 0, 1, 1, "chan" if v in ("gamma", "beta") else "stat")
                for v in ("gamma", "beta", "moving_mean", "moving_variance")], 1
    if layer.cls in ("LayerNormalization", "GroupNormalization"):
        return [(f"{n}/gamma", 0, 1, 1, "chan"), (f"{n}/beta", 0, 1, 1, "chan")], 1
    if layer.cls == "RMSNormalization":
        return [(f"{n}/scale", 0, 1, 1, "chan")], 1
    if layer.cls == "PReLU":
        shp = layer.in_shapes[0] if layer.in_shapes else None
        rank = len(shp) if shp else 0
        shared = [a % rank for a in (cfg.get("shared_axes") or [])] if rank else []
        if rank and rank - 1 in shared:
            return [], 1  # one alpha for all channels: nothing to edit
        return [(f"{n}/alpha", -1, 1, 1, "chan")], 1
    if layer.cls in DEPTHWISE:
        mult = int(cfg.get("depth_multiplier", 1))
        return [(f"{n}/kernel", -2, 1, 1, "chan"), (f"{n}/bias", 0, 1, mult, "chan")], mult
    return [], 1  # UnitNormalization: no weights


def expand_index(index, blocks=1, mult=1, width=0):
    """Old channel ``index`` laid out for ``blocks`` gate blocks of ``width`` old channels
    (block-major) and a depth multiplier ``mult`` (channel c -> c*mult .. c*mult+mult-1)."""
    out = [int(v) * mult + j for v in index for j in range(mult)]
    return [b * width * mult + v for b in range(blocks) for v in out]


def expand_factors(factors, blocks=1, mult=1):
    if factors is None:
        return None
    return [float(f) for f in factors for _ in range(mult)] * blocks


def check_axis(g, verb, layer, in_shape, strict):
    """Refuse a per-channel layer that does not act on the last axis only, or (``strict``:
    function-preserving edits) one that normalises across channels."""
    cfg, cls, name = layer.config, layer.cls, layer.name
    rank = len(in_shape) if in_shape else None
    last = (-1, [-1]) + ((rank - 1, [rank - 1]) if rank else ())
    if cls in ("BatchNormalization", "LayerNormalization", "RMSNormalization",
               "UnitNormalization", "GroupNormalization") and cfg.get("axis", -1) not in last:
        _refuse(g, verb, name, f"{cls} must normalise the last (channel) axis only")
    if strict and cls in ACROSS and not per_channel_groups(layer, in_shape):
        _refuse(g, verb, name, f"{cls} normalises across channels, so replicating channels "
                "changes the function (only deletions follow it; GroupNormalization with "
                "one channel per group is per-channel)")


def per_channel_groups(layer, in_shape):
    """GroupNormalization with one channel per group (``groups=-1``, saved by Keras as the
    width): instance normalization, a per-channel op."""
    groups = layer.config.get("groups", 32)
    return layer.cls == "GroupNormalization" and (
        groups == -1 or bool(in_shape) and in_shape[-1] is not None and groups == in_shape[-1])


def check_groups(g, verb, layer, old_shape, new_width):
    """Keep one channel per group (instance norm) per channel; otherwise the new width must
    be a multiple of the group count."""
    groups = int(layer.config.get("groups", 32))
    if per_channel_groups(layer, old_shape):
        if groups != -1:
            layer.config["groups"] = new_width
        return
    if groups != -1 and (new_width < groups or new_width % groups):
        _refuse(g, verb, layer.name, f"GroupNormalization has groups={groups} and the new "
                f"width {new_width} is not a multiple of it; choose a width divisible by {groups}")
