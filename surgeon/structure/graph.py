"""The layer graph of a saved Keras 3 model, read from and written back to ``config.json``.

Works on the JSON only (no Keras import): Functional models (layers with
``inbound_nodes``) and Sequential models (an ordered ``layers`` list). Supports the
rewiring structural surgery needs: insert a layer after another, remove a layer,
replace a layer, and queries (producers, consumers, tensor shapes).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from surgeon.core.errors import SurgeonError

KT = "__keras_tensor__"


@dataclass
class Layer:
    """One layer of the graph: its raw config item and where its inputs come from."""

    name: str
    cls: str
    item: dict
    inputs: list = field(default_factory=list)   # producer layer names, call order
    in_shapes: list = field(default_factory=list)  # shapes of those inputs (or None)
    shared: bool = False  # called more than once (several inbound nodes)
    role: str = ""  # inlined nested models: "inner", "nested_input" or "alias" (see Graph)
    hook: tuple = ()  # nested_input: (the nested model's outer Layer, its input index)
    inlined: bool = False  # a layer of a nested model (serialised inside its item)

    @property
    def config(self) -> dict:
        return self.item.setdefault("config", {})


def _keras_tensors(obj):
    """Every serialized KerasTensor inside an inbound-node structure, in order."""
    if isinstance(obj, dict):
        if obj.get("class_name") == KT:
            yield obj
            return
        for v in obj.values():
            yield from _keras_tensors(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keras_tensors(v)


def _shape(s):
    return tuple(s) if isinstance(s, list) else None


NESTED = ("Functional", "Sequential")


class Graph:
    """A model's layer graph (Functional or Sequential), editable, serialisable back.

    ``inline``: nested (unshared) Functional/Sequential models are followed inside, for
    channel edits: their layers join the graph as ``outer/inner`` (their weights' names),
    each input layer becomes a pass-through fed by the nested model's caller
    (``NestedInput``) and the nested model itself a pass-through of its output layer
    (``NestedOutput``); edits to their configs land in the nested config in place."""

    def __init__(self, model_json: dict, label: str = "model", inline: bool = False,
                 _copy: bool = True):
        self.label = label
        self.json = copy.deepcopy(model_json) if _copy else model_json
        self.kind = self.json.get("class_name")
        if self.kind not in ("Functional", "Sequential"):
            raise SurgeonError(f"{label}: structural surgery supports Functional and Sequential "
                               f"models; this model is a {self.kind!r} (subclassed models have "
                               "no editable layer graph)")
        cfg = self.json.get("config") or {}
        self.layers: dict[str, Layer] = {}
        prev = None
        for item in cfg.get("layers", []):
            name = (item.get("config") or {}).get("name") or item.get("name")
            layer = Layer(name, item.get("class_name"), item)
            if self.kind == "Functional":
                nodes = item.get("inbound_nodes") or []
                layer.shared = len(nodes) > 1
                for kt in _keras_tensors(nodes[:1]):
                    layer.inputs.append(kt["config"]["keras_history"][0])
                    layer.in_shapes.append(_shape(kt["config"].get("shape")))
            elif prev is not None:
                layer.inputs = [prev]
                bc = (item.get("build_config") or {}).get("input_shape")
                layer.in_shapes = [_shape(bc)]
            self.layers[name] = layer
            prev = name
        if self.kind == "Sequential" and self.layers:
            first = next(iter(self.layers.values()))
            if first.cls != "InputLayer" and cfg.get("build_input_shape"):
                first.in_shapes = [_shape(cfg["build_input_shape"])]
        if inline:
            for layer in list(self.layers.values()):
                if layer.cls in NESTED and not layer.shared and layer.role == "":
                    self._inline(layer)

    def input_names(self) -> list:
        if self.kind == "Sequential":
            first = next(iter(self.layers), None)
            return [first] if first is not None else []
        refs = self.json["config"].get("input_layers") or []
        if refs and isinstance(refs[0], str):
            refs = [refs]
        return [r[0] for r in refs]

    def _inline(self, outer):
        sub = Graph(outer.item, f"{self.label}: {outer.name}", inline=True, _copy=False)
        ins, outs = sub.input_names(), sub.outputs()
        if len(outs) != 1 or len(ins) != len(outer.inputs):
            return  # left opaque: a channel edit reaching it is refused
        p = outer.name + "/"
        for n, l in sub.layers.items():
            l.name, l.inputs = p + n, [p + i for i in l.inputs]
            l.role, l.inlined = l.role or "inner", True
            if n in ins:
                k = ins.index(n)
                if l.cls == "InputLayer":
                    l.cls, l.role, l.hook = "NestedInput", "nested_input", (outer, k)
                l.inputs, l.in_shapes = [outer.inputs[k]], [outer.in_shapes[k]]
            l.item.pop("build_config", None)  # rebuilt from the tensors it is called on
            self.layers[l.name] = l
        outer.item.pop("build_config", None)
        outer.config.pop("build_input_shape", None)
        outer.cls, outer.role = "NestedOutput", "alias"
        outer.inputs, outer.in_shapes = [p + outs[0]], [sub.out_shape(outs[0])]

    # -- queries -------------------------------------------------------------------
    def layer(self, name) -> Layer:
        if name not in self.layers:
            names = ", ".join(n for n, l in self.layers.items() if l.cls != "InputLayer")
            raise SurgeonError(f"{self.label}: no layer named {name!r}; layers: {names}")
        return self.layers[name]

    def consumers(self, name) -> list:
        return [l.name for l in self.layers.values() if name in l.inputs]

    def outputs(self) -> list:
        if self.kind == "Sequential":
            return [list(self.layers)[-1]] if self.layers else []
        refs = self.json["config"].get("output_layers") or []
        if refs and isinstance(refs[0], str):
            refs = [refs]
        return [r[0] for r in refs]

    def refuse_output(self, name, verb):
        """Refuse to put a new layer after a model output: it would become the output in
        the anchor's place (compiled losses and metrics name the outputs) and its shape
        is not recorded in the config."""
        if name in self.outputs():
            before = [i for i in self.layers[name].inputs if self.layers[i].cls != "InputLayer"]
            hint = f" (e.g. {before[0]!r}, its input)" if before else ""
            raise SurgeonError(f"{self.label}: cannot {verb} {name!r}: it is the model's output "
                               "layer, so the new layer would replace it as the model's output; "
                               f"choose a layer before the output{hint}")

    def out_shape(self, name):
        """The output shape of ``name`` as recorded in the config (None if not recorded)."""
        layer = self.layers[name]
        if layer.cls == "InputLayer":
            return _shape(layer.config.get("batch_shape"))
        for c in self.consumers(name):
            cl = self.layers[c]
            for src, shp in zip(cl.inputs, cl.in_shapes):
                if src == name and shp is not None:
                    return shp
        return None

    # -- edits ---------------------------------------------------------------------
    def _rename_refs(self, obj, old, new):
        for kt in _keras_tensors(obj):
            hist = kt["config"]["keras_history"]
            if hist[0] == old:
                kt["config"]["keras_history"] = [new, 0, 0]

    def _redirect_consumers(self, old, new, skip=()):
        for layer in self.layers.values():
            if layer.name in skip or old not in layer.inputs:
                continue
            layer.inputs = [new if i == old else i for i in layer.inputs]
            if self.kind == "Functional":
                self._rename_refs(layer.item.get("inbound_nodes"), old, new)
        if self.kind == "Functional":
            cfg = self.json["config"]
            refs = cfg.get("output_layers")
            if refs and isinstance(refs[0], str):
                if refs[0] == old:
                    cfg["output_layers"] = [new, 0, 0]
            elif refs:
                cfg["output_layers"] = [[new, 0, 0] if r[0] == old else r for r in refs]

    def _insert_item_after(self, anchor, name, layer):
        items = list(self.layers.items())
        pos = [n for n, _ in items].index(anchor) + 1
        items.insert(pos, (name, layer))
        self.layers = dict(items)

    def insert_after(self, anchor, item):
        """Insert layer ``item`` (a config item) consuming ``anchor``'s output; every
        former consumer of ``anchor`` (and the model output) now consumes the new layer."""
        self.layer(anchor)
        self.refuse_output(anchor, "insert a layer after")
        name = item["config"]["name"]
        if name in self.layers:
            raise SurgeonError(f"{self.label}: a layer named {name!r} already exists; pass another --name")
        item = copy.deepcopy(item)
        item["name"] = name
        shape = self.out_shape(anchor)
        if self.kind == "Functional":
            item["inbound_nodes"] = [{"args": [{"class_name": KT, "config": {
                "shape": list(shape) if shape else None, "dtype": "float32",
                "keras_history": [anchor, 0, 0]}}], "kwargs": {}}]
        self._redirect_consumers(anchor, name)
        self._insert_item_after(anchor, name, Layer(name, item["class_name"], item, [anchor], [shape]))

    def remove(self, name):
        """Remove a single-input layer; its consumers take its input instead."""
        layer = self.layer(name)
        if layer.cls == "InputLayer":
            raise SurgeonError(f"{self.label}: cannot delete input layer {name!r}")
        if layer.shared or len(layer.inputs) != 1:
            raise SurgeonError(f"{self.label}: cannot delete {name!r}: it has {len(layer.inputs)} "
                               "inputs" + (" and is shared" if layer.shared else "")
                               + "; only single-input layers can be bypassed")
        src = layer.inputs[0]
        if self.kind == "Functional" and self.layers[src].cls == "InputLayer" and name in self.outputs():
            raise SurgeonError(f"{self.label}: cannot delete {name!r}: the model output would be its input")
        del self.layers[name]
        self._redirect_consumers(name, src)

    def replace(self, name, item):
        """Put layer ``item`` in ``name``'s place (same inputs, same consumers)."""
        old = self.layer(name)
        if old.cls == "InputLayer":
            raise SurgeonError(f"{self.label}: cannot replace input layer {name!r}")
        new_name = item["config"]["name"]
        if new_name != name and new_name in self.layers:
            raise SurgeonError(f"{self.label}: a layer named {new_name!r} already exists; pass another --name")
        item = copy.deepcopy(item)
        item["name"] = new_name
        if self.kind == "Functional":
            item["inbound_nodes"] = copy.deepcopy(old.item.get("inbound_nodes", []))
        new = Layer(new_name, item["class_name"], item, list(old.inputs), list(old.in_shapes), old.shared)
        self.layers = {(new_name if n == name else n): (new if n == name else l)
                       for n, l in self.layers.items()}
        if new_name != name:
            self._redirect_consumers(name, new_name)

    def set_in_shape(self, name, index, shape):
        """Record a new input shape (keeps the config self-consistent after a width change)."""
        layer = self.layers[name]
        layer.in_shapes[index] = tuple(shape)
        if layer.role == "alias":
            return  # its consumers record the shape in their own inbound nodes
        if layer.role == "nested_input":  # a nested model's input layer and its caller's tensor
            outer, k = layer.hook
            layer.config["batch_shape"] = list(shape)
            layer, index = outer, k
        # the Functional inbound node (a nested Functional's too, inside a Sequential)
        kts = list(_keras_tensors((layer.item.get("inbound_nodes") or [])[:1]))
        if index < len(kts):
            kts[index]["config"]["shape"] = list(shape)

    # -- output --------------------------------------------------------------------
    def to_json(self) -> dict:
        """The edited model config (``build_config`` of layers dropped: Keras rebuilds
        each layer from the tensors it is called on, so stale shapes cannot leak in)."""
        out = copy.deepcopy(self.json)
        items = []
        for layer in self.layers.values():
            if layer.inlined:
                continue  # serialised inside its nested model's item
            item = copy.deepcopy(layer.item)
            item.pop("build_config", None)
            items.append(item)
        out["config"]["layers"] = items
        return out
