"""Propagate a change of a layer's output channels through the graph.

A channel edit replaces the output channels of a producer (Dense, Conv, Conv*Transpose,
SeparableConv, Embedding, LSTM/GRU/SimpleRNN, Bidirectional) by ``index`` (new channel j is
old channel ``index[j]``: slicing deletes, repeating replicates). Every tensor that carries
those channels follows: per-channel layers (BatchNormalization, DepthwiseConv, PReLU, the
normalizations over the channel axis; see :mod:`.kinds`), Flatten (index map over spatial
positions), Concatenate (offset), and the incoming weights of every consumer (``take`` on
the kernel's input axis, times ``consumer_scale``). Elementwise merges (Add, ...) need all
their inputs edited alike: the other branches are followed upstream to their own
producer, which is edited the same way; if a branch cannot be (model input, Concatenate,
unknown layer), the edit is refused with the branch named.
"""
from __future__ import annotations

import numpy as np

from surgeon.core.errors import SurgeonError
from . import kinds as K
from .kinds import CONSUMERS, PER_CHANNEL, PRODUCERS
from .plan import TensorAction

PASSTHROUGH = (
    "ReLU", "LeakyReLU", "ELU", "Activation", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
    "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalAveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D",
    "UpSampling1D", "UpSampling2D", "UpSampling3D", "Identity", "ActivityRegularization",
    "NestedInput", "NestedOutput",  # the boundaries of a nested model (see Graph inline)
)
MERGES = ("Add", "Subtract", "Average", "Maximum", "Minimum", "Multiply")
THROUGH = PER_CHANNEL + PASSTHROUGH + ("Flatten", "Concatenate") + MERGES
NOT_ELEMENTWISE = ("softmax", "log_softmax")


def supported_kinds() -> str:
    return (f"edited layers: {', '.join(PRODUCERS)}; followed through: "
            f"{', '.join(PER_CHANNEL + ('Flatten', 'Concatenate') + MERGES)}, consumers' inputs "
            f"({', '.join(CONSUMERS)}) and "
            "channel-wise layers (activations, dropout, pooling, padding, ...)")


class ChannelEdit:
    """Plan the propagation of one output-channel change. ``verb`` names it in messages."""

    def __init__(self, graph, names, start, index, consumer_scale=None, slot_scale=None,
                 verb="edit", function_preserving=False):
        self.g, self.names, self.start, self.verb = graph, set(names), start, verb
        self.index = [int(i) for i in index]
        self.consumer_scale = consumer_scale
        self.slot_scale = slot_scale
        self.strict = function_preserving
        self.what = f"{verb} {start!r}"  # "widen 'stem'": messages name the edit and the layer
        self.producers, self.edited = [], set()
        self.actions, self.changed = {}, []
        self.shapes = {n: list(l.in_shapes) for n, l in graph.layers.items()}  # before the edit

    # -- phase 1: which tensors carry the edited channels --------------------------
    def _check_layer(self, name):
        layer = self.g.layers[name]
        if layer.shared:
            raise SurgeonError(f"{self.g.label}: cannot {self.what} through {name!r}: the layer is "
                               "shared (called more than once)")
        cfg = layer.config
        if cfg.get("data_format") == "channels_first":
            raise SurgeonError(f"{self.g.label}: cannot {self.what} through {name!r}: only "
                               "channels_last layers are supported")
        if layer.cls in PRODUCERS and cfg.get("groups", 1) != 1:
            raise SurgeonError(f"{self.g.label}: cannot {self.what} through {name!r}: grouped "
                               "convolutions are not supported")
        if layer.cls in PER_CHANNEL:
            shp = layer.in_shapes[0] if layer.in_shapes else None
            K.check_axis(self.g, self.what, layer, shp, self.strict)
        if layer.cls in K.RECURRENT:
            K.rnn_parts(self.g, layer, self.what)

    def _mark(self, name, pending):
        if name not in self.edited:
            self.edited.add(name)
            pending.append(name)

    def _pull(self, name, path, pending):
        """Make tensor ``name`` (another input of a merge) carry the edit, upstream."""
        if name in self.edited:
            return
        layer = self.g.layers[name]
        self._check_layer(name)
        if layer.cls in PRODUCERS:
            self.producers.append(name)
            self._mark(name, pending)
            return
        if layer.cls in K.DEPTHWISE and int(layer.config.get("depth_multiplier", 1)) != 1:
            pass  # its output is the input map expanded: cannot carry the same edit
        elif layer.cls in PER_CHANNEL + PASSTHROUGH + MERGES and layer.inputs:
            self._mark(name, pending)
            for src in layer.inputs:
                self._pull(src, path + [src], pending)
            return
        branch = " <- ".join(path)
        raise SurgeonError(
            f"{self.g.label}: cannot {self.verb} {self.start!r}: its channels meet branch "
            f"{branch} at a merge, and that branch starts at {name!r} ({layer.cls}), which "
            f"cannot be edited the same way; edit a layer whose branches all start at an edited "
            f"layer "
            f"({supported_kinds()})")

    def _reach(self):
        self.producers.append(self.start)
        pending = [self.start]
        self.edited.add(self.start)
        while pending:
            name = pending.pop()
            if name in self.g.outputs():
                raise SurgeonError(f"{self.g.label}: cannot {self.verb} {self.start!r}: the change "
                                   f"reaches the model output {name!r} (its shape would change)")
            for c in self.g.consumers(name):
                layer = self.g.layers[c]
                self._check_layer(c)
                if layer.cls in CONSUMERS:
                    continue
                if layer.cls not in THROUGH:
                    raise SurgeonError(
                        f"{self.g.label}: cannot {self.verb} {self.start!r}: its output reaches "
                        f"{c!r}, a {layer.cls} layer that cannot follow a channel change; "
                        f"supported: {supported_kinds()}")
                act = layer.config.get("activation")
                if self.strict and layer.cls == "Activation" and act in NOT_ELEMENTWISE:
                    raise SurgeonError(f"{self.g.label}: cannot {self.verb} {self.start!r}: "
                                       f"{c!r} applies {act} across channels")
                self._mark(c, pending)
                if layer.cls in MERGES:
                    for src in layer.inputs:
                        self._pull(src, [c, src], pending)

    # -- phase 2: index maps in topological order ----------------------------------
    def _topo(self):
        order, seen = [], set()

        def visit(n):
            if n in seen:
                return
            seen.add(n)
            for i in self.g.layers[n].inputs:
                visit(i)
            order.append(n)
        for n in self.g.layers:
            visit(n)
        return order

    def _act(self, target):
        if target not in self.names:
            return None
        return self.actions.setdefault(target, TensorAction(target, target, why=f"{self.verb} {self.start}"))

    def _apply(self, spec, m):
        """Gather variable ``spec[0]`` by map ``m`` as the spec's mode says."""
        var, axis, blocks, mult, mode = spec
        a = self._act(var)
        if a is None:
            return
        width = self._old_width if mode == "out" else 0  # gate blocks: producers only
        a.steps.append({"op": "take", "axis": axis,
                        "index": K.expand_index(m[0], blocks, mult, width)})
        factors, on = (m[1], "param") if mode == "in" else (m[2], "slots")
        if mode == "stat":
            factors = None
        if factors is not None:
            a.steps.append({"op": "scale", "axis": axis, "on": on,
                            "factors": K.expand_factors(factors, blocks, mult)})

    def _out_edit(self, name, width):
        layer = self.g.layers[name]
        self._old_width = K.width(self.g, layer)
        m = (self.index, self.consumer_scale, self.slot_scale)
        for spec in K.out_specs(self.g, layer):
            self._apply(spec, m)
        K.set_width(self.g, layer, len(self.index))
        if layer.cls == "Bidirectional" and layer.config.get("merge_mode") == "concat":
            w, idx = self._old_width, self.index
            dup = (lambda f: None if f is None else list(f) * 2)
            return (idx + [w + i for i in idx], dup(self.consumer_scale), dup(self.slot_scale))
        return m

    def _in_edit(self, name, m):
        for spec in K.in_specs(self.g, self.g.layers[name]):
            self._apply(spec, m)

    def _chan_edit(self, name, m):
        layer = self.g.layers[name]
        if layer.cls == "GroupNormalization":
            K.check_groups(self.g, self.what, layer, self.shapes[name][0], len(m[0]))
        specs, mult = K.chan_specs(layer)
        for spec in specs:
            self._apply(spec, m)
        if mult == 1:
            return m
        # a depthwise output: channel c -> c*mult .. c*mult+mult-1
        return (K.expand_index(m[0], 1, mult), K.expand_factors(m[1], 1, mult),
                K.expand_factors(m[2], 1, mult))

    def _flatten(self, name, m):
        shp = self.shapes[name][0]
        if shp is None or any(d is None for d in shp[1:]):
            raise SurgeonError(f"{self.g.label}: cannot {self.what} through Flatten {name!r}: its "
                               "input shape is not fully known in the config")
        if len(shp) == 2:
            return m
        spatial, c_old = int(np.prod(shp[1:-1])), shp[-1]
        idx = [s * c_old + j for s in range(spatial) for j in m[0]]
        tile = (lambda f: None if f is None else [x for _ in range(spatial) for x in f])
        return (idx, tile(m[1]), tile(m[2]))

    def _concat(self, name, maps):
        layer = self.g.layers[name]
        shapes = self.shapes[name]
        axis = layer.config.get("axis", -1)
        if any(s is None for s in shapes) or axis not in (-1, len(shapes[0]) - 1):
            raise SurgeonError(f"{self.g.label}: cannot {self.what} through Concatenate {name!r}: "
                               "only concatenation on the last axis with known shapes is supported")
        idx, cfac, sfac, off = [], [], [], 0
        for shp, m in zip(shapes, maps):
            if m is None:
                m = (list(range(shp[-1])), None, None)
            idx += [off + j for j in m[0]]
            cfac += list(m[1]) if m[1] is not None else [1.0] * len(m[0])
            sfac += list(m[2]) if m[2] is not None else [1.0] * len(m[0])
            off += shp[-1]
        return (idx, None if self.consumer_scale is None else cfac,
                None if self.slot_scale is None else sfac)

    def _merge(self, name, maps):
        if any(m is None for m in maps) or any(m != maps[0] for m in maps):
            raise SurgeonError(f"{self.g.label}: cannot {self.verb} {self.start!r}: the inputs of "
                               f"merge {name!r} would not carry the same channels")
        return maps[0]

    def run(self):
        """Returns (actions, changed layer names); edits the graph's configs and shapes."""
        self._reach()
        space = {}
        for name in self._topo():
            layer = self.g.layers[name]
            maps = [space.get(i) for i in layer.inputs]
            for i, m in enumerate(maps):
                if m is not None and layer.in_shapes[i] is not None:
                    self.g.set_in_shape(name, i, tuple(layer.in_shapes[i][:-1]) + (len(m[0]),))
            if layer.cls in CONSUMERS and any(m is not None for m in maps):
                self._in_edit(name, next(m for m in maps if m is not None))
                self.changed.append(name)
            if name in self.producers:
                space[name] = self._out_edit(name, len(self.index))
                if name not in self.changed:
                    self.changed.append(name)
            elif name in self.edited:
                space[name] = self._through(name, layer, maps)
        return list(self.actions.values()), self.changed

    def _through(self, name, layer, maps):
        if layer.cls == "Flatten":
            return self._flatten(name, maps[0])
        if layer.cls == "Concatenate":
            return self._concat(name, maps)
        if layer.cls in MERGES:
            return self._merge(name, maps)
        if layer.cls in PER_CHANNEL:
            self.changed.append(name)
            return self._chan_edit(name, maps[0])
        return maps[0]
