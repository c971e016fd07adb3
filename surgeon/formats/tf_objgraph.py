"""TF2 object-based bundles: canonical names from the ``TrackableObjectGraph``.

The graph (stored under ``_CHECKPOINTABLE_OBJECT_GRAPH``) lists objects, the named
edges between them, the checkpoint key of every variable (with the variable's own
name, ``full_name``) and, for legacy TF optimizers, ``slot_variables`` records tying a
slot to its variable. Names come from the graph, never from the key strings:

* a variable's canonical name is the chain of *named* layers above it (SavedModel
  object metadata records Keras layer names) plus its leaf name; without recorded
  layer names it is the variable's ``full_name`` (Keras 3's variable path, e.g.
  ``conv1/kernel``, ``lstm/lstm_cell/kernel``);
* Keras 3 optimizers keep per-slot lists (``_momentums/<i>``) parallel to
  ``_trainable_variables/<i>``: slot i belongs to trainable variable i;
* legacy optimizers (tf.keras OptimizerV2, ``tf.compat.v1.train``) record
  ``slot_variables`` (original node, slot name, slot node).
"""
from __future__ import annotations

import json
import re
from collections import deque

from surgeon.core.tree import Entry, OptimizerInfo, slot_name
from surgeon.binding.layers import _TRAINABLE
from .tf_v1names import NON_TRAINABLE, Mapping

VALUE = "VARIABLE_VALUE"
# Legacy slot names -> Keras 3 slot names.
SLOT_NAMES = {"m": "momentum", "v": "velocity", "vhat": "velocity_hat", "rms": "velocity",
              "mg": "average_gradient", "accum": "accumulated_grad",
              "accum_update": "accumulated_delta_var"}
GLOBAL_NAMES = {"iter": "iteration", "_iterations": "iteration", "iterations": "iteration",
                "_learning_rate": "learning_rate"}
# Leaf names of weights built-in layers create trainable (a frozen layer's kernel).
TRAINABLE_LEAVES = {n for names in _TRAINABLE.values() for n in names}
_GENERIC = re.compile(r"^Variable(_\d+)?$")
_LEGACY_CLASSES = {"Adam": "Adam", "RMSProp": "RMSprop", "RMSprop": "RMSprop",
                   "Momentum": "SGD", "SGD": "SGD", "Adagrad": "Adagrad", "Ftrl": "Ftrl",
                   "Adadelta": "Adadelta", "Adamax": "Adamax", "Nadam": "Nadam"}


class Graph:
    """The parsed object graph plus optional SavedModel object metadata (same node ids)."""

    def __init__(self, proto, keys, saved_nodes=None, config=None):
        self.nodes = proto.nodes
        self.config, self.unnamed, self.subclassed = config, False, False
        self.keys = keys
        self.var_key, self.full_name, self.hidden = {}, {}, []
        for i, n in enumerate(self.nodes):
            for a in n.attributes:
                if a.name == VALUE and a.checkpoint_key in keys and i not in self.var_key:
                    self.var_key[i] = a.checkpoint_key
                    self.full_name[i] = a.full_name.split(":")[0]
                else:
                    self.hidden.append(a.checkpoint_key)
        self.layer_name, self.layer_trainable, self.var_trainable = {}, {}, {}
        if saved_nodes is not None and len(saved_nodes) >= len(self.nodes):
            self._read_saved(saved_nodes)
        self.optimizers = [i for i, n in enumerate(self.nodes) if self._is_optimizer(i, n)]

    def _read_saved(self, saved_nodes):
        for i in range(len(self.nodes)):
            s = saved_nodes[i]
            kind = s.WhichOneof("kind")
            if kind == "variable":
                self.var_trainable[i] = bool(s.variable.trainable)
            elif kind == "user_object" and s.user_object.metadata:
                try:
                    md = json.loads(s.user_object.metadata)
                except ValueError:
                    continue
                if isinstance(md, dict) and isinstance(md.get("name"), str) and i:
                    self.layer_name[i] = md["name"]
                    self.layer_trainable[i] = md.get("trainable", True) is not False

    def _is_optimizer(self, i, node):
        names = {c.local_name for c in node.children}
        return bool(node.slot_variables) or "_iterations" in names or (
            "iter" in names and "learning_rate" in names)

    def children(self, i):
        return [(c.local_name, c.node_id) for c in self.nodes[i].children]


def _bfs(g: Graph):
    """First parent and edge of every node reachable from the root without crossing an
    optimizer; and for each variable, its first owner through a named (non-index) edge."""
    parent, owner = {0: None}, {}
    queue = deque([0])
    skip = set(g.optimizers)
    while queue:
        i = queue.popleft()
        for edge, j in g.children(i):
            if j in skip:
                continue
            if j in g.var_key and not edge.isdigit() and j not in owner:
                owner[j] = (i, edge)
            if j not in parent:
                parent[j] = (i, edge)
                queue.append(j)
    return parent, owner


def _dfs_order(g):
    """Variables in depth-first (model) order, optimizers skipped."""
    seen, order, stack = {0}, [], [0]
    skip = set(g.optimizers)
    while stack:
        i = stack.pop()
        if i in g.var_key:
            order.append(i)
        for _, j in reversed(g.children(i)):
            if j not in seen and j not in skip:
                seen.add(j)
                stack.append(j)
    return {j: k for k, j in enumerate(order)}


def _nested_models(g, parent):
    """Nested Keras 3 models below the top one (their names are not in the graph)."""
    tops = {j for e, j in g.children(0)}
    return [i for i in parent if i and i not in tops and i not in g.layer_name and any(
        e in ("_operations", "_layers") for e, _ in g.children(i))]


def _layer_chain(g, parent, node):
    chain = []
    while node:
        if node in g.layer_name:
            chain.append(node)
        node = parent[node][0] if parent.get(node) else None
    return chain[::-1]


def _graph_path(parent, node):
    parts = []
    while parent.get(node):
        node, edge = parent[node]
        parts.append(edge)
    return "/".join(reversed(parts))


def _is_model(g, i):
    return any(e in ("_operations", "_functional") for e, _ in g.children(i))


def _is_list(g, i):
    kids = g.children(i)
    return bool(kids) and all(e.isdigit() for e, _ in kids)


def _in_model(g, parent, layer, full):
    """A Keras 3 variable's canonical name from its path and the graph.

    The path is the name scope the variable was built in: ``<layer>/<sublayer>/<var>``,
    prefixed by the Sequential's own name when a Sequential builds its layers
    (``seq/tok/embeddings``) and without the nested model's name when a nested Functional
    model built its layers. The canonical name keeps one path component per layer node
    from the model down to the owner, plus the leaf; the top model's name is left out;
    nested models are named from the model config (``--model``), their index in the
    parent's ``_operations`` being their index in the config's ``layers``. Without a
    config (or one that does not fit), names inside nested models are their paths."""
    chain, node = [], layer
    while node is not None:
        chain.append((node, parent[node][1] if parent.get(node) else ""))
        node = parent[node][0] if parent.get(node) else None
    models = [k for k, (n, e) in enumerate(chain) if _is_model(g, n) and e != "_functional"]
    if not models:
        return _in_subclassed(g, chain, full)
    below = [k for k in range(models[0]) if not _is_list(g, chain[k][0])
             and not _is_model(g, chain[k][0])]
    parts = full.split("/")
    if not below or len(parts) <= len(below):
        return full
    rel = parts[-(len(below) + 1):]
    if len(models) == 1:
        return "/".join(rel)
    names = _nested_names(g, chain, models, below[-1], rel[0])
    if names is None:
        g.unnamed = True
        return full
    return "/".join(names + rel)


def _in_subclassed(g, chain, full):
    """A variable of a subclassed model: its TF name is the name scope it happened to be
    created in (``sub/kernel`` for a sublayer built inside the model's ``call``), so the
    layer part comes from the graph: the attributes from the model down to the owner
    (``body``, ``gate``), which are the layer names when each layer is held by an
    attribute of its own name; the leaf is the variable's own name (``add_weight``)."""
    top = len(chain) - 1
    if top >= 1 and chain[top][0] == 0 and chain[top - 1][1] == "model":
        top -= 1  # tf.train.Checkpoint(model=...): the model is the root's child
    edges = [e for _, e in chain[:top]][::-1]
    if not full or any(e.startswith("_") for e in edges) or not _keras3(g, chain[top][0]):
        return full
    g.subclassed = True
    return "/".join(edges + [full.rsplit("/", 1)[-1]])


def _keras3(g, model):
    """Is ``model`` a Keras 3 model (compiled: its ``_compiled_trainable_state``, or with a
    Keras 3 optimizer)? Other trackables (``tf.Module``) keep their variables' TF names."""
    kids = dict(g.children(model))
    return "_compiled_trainable_state" in kids or any(
        "_trainable_variables" in dict(g.children(o)) for o in g.optimizers)


def _nested_names(g, chain, models, top_layer, layer_name):
    """Names of the nested models in ``chain`` (outermost first) from the model config,
    checked against the owning layer's own name; None without a fitting config."""
    cfg, names = g.config, []
    for k in reversed(models[:-1]):
        item = _config_item(cfg, chain[k][1])
        if item is None or not isinstance((item.get("config") or {}).get("layers"), list):
            return None
        names.append(item["config"].get("name") or item.get("name"))
        cfg = item
    item = _config_item(cfg, chain[top_layer][1])
    if item is None or (item.get("config") or {}).get("name", item.get("name")) != layer_name:
        return None
    return names if all(isinstance(n, str) for n in names) else None


def _config_item(cfg, edge):
    layers = ((cfg or {}).get("config") or {}).get("layers") if isinstance(cfg, dict) else None
    if not isinstance(layers, list) or not edge.isdigit() or int(edge) >= len(layers):
        return None
    item = layers[int(edge)]
    return item if isinstance(item, dict) else None


def _model_names(g, parent, owner):
    """node -> (canonical name, layer, frozen) for every variable reachable from the root."""
    out = {}
    for j in [n for n in parent if n in g.var_key]:  # discovery (model) order
        full = g.full_name.get(j, "")
        p = owner.get(j, parent[j])[0]
        chain = _layer_chain(g, parent, p) if j in owner else []
        if chain:
            leaf = full.rsplit("/", 1)[-1] if full else owner[j][1].lstrip("_")
            layer = "/".join(g.layer_name[n] for n in chain)
            frozen = not all(g.layer_trainable.get(n, True) for n in chain)
            out[j] = (f"{layer}/{leaf}", layer, frozen)
        elif full and not _GENERIC.match(full):
            full = _in_model(g, parent, p, full) if j in owner else full
            out[j] = (full, full.rsplit("/", 1)[0] if "/" in full else "", False)
        else:
            path = _graph_path(parent, j)
            out[j] = (path, path.rsplit("/", 1)[0] if "/" in path else "", False)
    return out


def _singular(attr):
    s = attr.lstrip("_")
    return s[:-3] + "y" if s.endswith("ies") else s[:-1] if s.endswith("s") else s


def _keras3_slots(g, opt):
    """(slots {slot node: (param node, slot)}, globals {node: name}, storage name)."""
    kids = dict(g.children(opt))
    if "_trainable_variables" not in kids:
        return {}, {}, None
    params = [j for _, j in g.children(kids["_trainable_variables"])]
    slots, globs = {}, {}
    for attr, lst in g.children(opt):
        if attr in ("_variables", "_trainable_variables") or lst in g.var_key:
            if lst in g.var_key:
                globs[lst] = GLOBAL_NAMES.get(attr, attr.lstrip("_"))
            continue
        items = g.children(lst)
        if not items or len(items) != len(params) or not all(
                e.isdigit() and j in g.var_key for e, j in items):
            continue
        for (e, j), p in zip(items, params):
            slots[j] = (p, _slot_suffix(g, j, p) or _singular(attr))
    it = next((j for j, n in globs.items() if n == "iteration"), None)
    storage = g.full_name.get(it, "").split("/")[0] if it is not None else None
    for _, j in g.children(kids["_variables"]) if "_variables" in kids else ():
        if j not in slots and j not in globs:
            globs[j] = g.full_name.get(j, str(j)).rsplit("/", 1)[-1]
    return slots, globs, storage


def _slot_suffix(g, slot, param):
    """``adam/conv1_kernel_momentum`` with param path ``conv1/kernel`` -> ``momentum``."""
    full, pfull = g.full_name.get(slot, ""), g.full_name.get(param, "")
    stem = full.split("/", 1)[-1]
    prefix = pfull.replace("/", "_") + "_"
    return stem[len(prefix):] if pfull and stem.startswith(prefix) else None


def _legacy_slots(g, opt):
    slots, globs, cls = {}, {}, None
    for rec in g.nodes[opt].slot_variables:
        slots[rec.slot_variable_node_id] = (rec.original_variable_node_id,
                                           SLOT_NAMES.get(rec.slot_name, rec.slot_name))
        full = g.full_name.get(rec.slot_variable_node_id, "")
        stem = re.sub(r"_\d+$", "", full.rsplit("/", 1)[-1]) if full else ""
        head = full.split("/", 1)[0]
        cls = cls or _LEGACY_CLASSES.get(stem) or _LEGACY_CLASSES.get(head)
    for attr, j in g.children(opt):
        if j in g.var_key:
            globs[j] = GLOBAL_NAMES.get(attr, attr.lstrip("_"))
    return slots, globs, cls


def map_graph(g: Graph) -> Mapping:
    """Canonical entries for every variable of an object-based bundle."""
    parent, owner = _bfs(g)
    names = _model_names(g, parent, owner)
    slots, globs, trainable, info = {}, {}, set(), None
    # LossScaleOptimizer (mixed precision): its own counters are optimizer/loss_scale/*;
    # the iteration, learning rate and slots are its inner optimizer's.
    wrappers = {opt: dict(g.children(opt)).get("inner_optimizer") for opt in g.optimizers}
    wrappers = {w: i for w, i in wrappers.items() if i in g.optimizers}
    for opt in sorted(g.optimizers, key=lambda o: o in wrappers):
        s, gl, storage = _keras3_slots(g, opt)
        cls = None
        if storage:
            from surgeon.binding.optimizers import class_from_storage_name
            cls = class_from_storage_name(storage)
            kids = dict(g.children(opt))
            trainable |= {j for _, j in g.children(kids["_trainable_variables"])}
        else:
            s, gl, cls = _legacy_slots(g, opt)
            storage = cls or "optimizer"
        if opt in wrappers:
            gl = {j: f"loss_scale/{n}" for j, n in gl.items()}
            if info is not None:
                info.wrapper = storage
        slots.update(s)
        globs.update(gl)
        trainable |= {p for p, _ in s.values()}
        info = info or OptimizerInfo(name=storage, class_name=cls)
    for j in trainable:  # params reachable only through the optimizer
        if j not in names and j in g.var_key:
            full = g.full_name.get(j) or g.var_key[j]
            names[j] = (full, full.rsplit("/", 1)[0] if "/" in full else "", False)
    rank = _dfs_order(g)
    names = dict(sorted(names.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    out = _entries(g, names, slots, globs, trainable, info, parent)
    if _nested_models(g, parent) and (g.unnamed or g.config is None):
        out.notes.append("nested models: TF checkpoints do not record layer names, so "
                         "weights inside a nested model are named by their variable path "
                         "(without the nested model's name); pass the model's .keras or "
                         "config.json as --model to name them as in .keras")
    return out


def _entries(g, names, slots, globs, trainable, info, parent):
    out = Mapping(optimizer=info)
    by_name, unsure = {}, []
    known = _Known(g)
    for j in names:
        if j in slots or j in globs:
            continue
        name, layer, frozen = names[j]
        if parent.get(j) == (0, "save_counter"):  # tf.train.Checkpoint bookkeeping
            continue
        shape, dtype = g.keys[g.var_key[j]]
        role, frozen = _role(g, j, name, dtype, frozen, trainable, known, unsure)
        e = Entry(name, shape, dtype, role, key=g.var_key[j], layer=layer,
                  frozen=frozen and role == "param")
        _add(out, by_name, e, j, g)
    for j, (p, kind) in slots.items():
        pname = names.get(p, (g.full_name.get(p) or str(p),))[0]
        shape, dtype = g.keys[g.var_key[j]]
        e = Entry(slot_name(pname, kind), shape, dtype, "slot", slot_of=pname, slot=kind,
                  key=g.var_key[j], layer=pname.rsplit("/", 1)[0] if "/" in pname else "")
        _add(out, by_name, e, j, g)
    for j, gname in globs.items():
        shape, dtype = g.keys[g.var_key[j]]
        _add(out, by_name, Entry(f"optimizer/{gname}", shape, dtype, "optimizer",
                                 key=g.var_key[j]), j, g)
    if unsure:
        roles = {"frozen params" if e.frozen else e.role for e in out.entries if e.name in unsure}
        out.notes.append(
            f"{len(unsure)} variable(s) ({', '.join(unsure[:5])}{', ...' * (len(unsure) > 5)}) "
            "are not trained by the optimizer and a TF checkpoint does not record whether "
            "each is a frozen weight or non-trainable state (add_weight(trainable=False)): "
            f"listed as {' or '.join(sorted(roles))}; pass --model MODEL.keras, with the "
            "model's classes registered, for Keras' own roles")
    return out


def _role(g, j, name, dtype, frozen, trainable, known, unsure):
    """(role, frozen) of a model variable. Trained by the optimizer (or recorded trainable)
    -> a param; else Keras' own role when the model's classes are available; else by its
    name: known state (moving_mean, count, ...) or a built-in layer's weight (a frozen
    kernel); anything else cannot be told apart and is added to ``unsure``."""
    leaf = name.rsplit("/", 1)[-1]
    if not dtype.startswith(("float", "bfloat", "complex")):
        return "state", False
    if j in trainable or g.var_trainable.get(j):
        return "param", frozen
    if not trainable and j not in g.var_trainable:  # no optimizer, no SavedModel record
        return ("state", False) if leaf in NON_TRAINABLE else ("param", frozen)
    roles = known().roles
    if name in roles:
        return ("state", False) if roles[name] == "state" else ("param", roles[name] == "frozen")
    if leaf in NON_TRAINABLE or (j in g.var_trainable and g.layer_name):
        return "state", False  # tf.keras keeps trainable=True on a frozen layer's weights
    if leaf in TRAINABLE_LEAVES:
        return "param", True
    unsure.append(name)
    # Keras 3 records trainable=False for both; a plain checkpoint records neither
    return ("state", False) if j in g.var_trainable else ("param", True)


class _Known:
    """Keras' own roles for the model's variables (see :mod:`keras_classes`), built on
    first use: only when a config is given and its classes are available."""

    def __init__(self, g):
        self.g, self.value = g, None

    def __call__(self):
        if self.value is None:
            from .keras_classes import KerasVars, from_config
            found = from_config(self.g.config) if self.g.config is not None else None
            self.value = found or KerasVars()
        return self.value


def _add(out, by_name, e, node, g):
    """Add an entry; a second variable with the same name, shape and dtype is an alias
    (Keras 3 exports store each variable twice) and is written together with the first."""
    prev = by_name.get(e.name)
    if prev is None:
        by_name[e.name] = e
        out.add(e, [e.key])
        return
    if (prev.shape, prev.dtype) == (e.shape, e.dtype):
        out.aliases[e.name].append(e.key)
        if not any(n.startswith("some variables are stored") for n in out.notes):
            out.notes.append("some variables are stored more than once (e.g. "
                             f"{e.name!r}); surgeon writes every copy")
        return
    raise ValueError(f"two different variables are both named {e.name!r}")
