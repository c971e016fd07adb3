"""Keras state-tree keys of an Orbax checkpoint <-> surgeon's canonical names.

``OrbaxCheckpoint`` saves ``model.get_state_tree()``: ``trainable_variables`` and
``non_trainable_variables`` keyed by each variable's path (``sequential/d1/kernel``: a
Sequential names its layers under its own name, a functional model does not),
``optimizer_variables/<optimizer name>/<var>`` where a slot is named
``<param path with _ for />_<slot>`` (``sequential_d1_kernel_momentum``) and the globals
``iteration`` and ``learning_rate`` are Python scalars, and ``metrics_variables``. The
canonical names are the ``.keras`` ones: ``d1/kernel``, ``optimizer/d1/kernel/momentum``,
``optimizer/iteration``; metric variables keep their key (``metrics_variables/loss/count``,
role ``state``). Any other PyTree is listed under its own path, every leaf a ``param``.
"""
from __future__ import annotations

from surgeon.binding import layers as layer_tables
from surgeon.binding.optimizers import class_from_storage_name, layout_for
from surgeon.core.tree import Entry, OptimizerInfo, slot_name

GROUPS = ("trainable_variables", "non_trainable_variables", "optimizer_variables",
          "metrics_variables")
from surgeon.core.tree import METRICS


def is_keras_tree(leaves) -> bool:
    tops = {leaf.keys[0] for leaf in leaves if leaf.keys}
    return bool(tops) and tops <= set(GROUPS)


def model_prefix(leaves, model_name):
    """The first path component Keras put before layer names (a Sequential's own name), or None."""
    paths = [leaf.keys[1:] for leaf in leaves if leaf.keys[0] in GROUPS[:2]]
    firsts = {p[0] for p in paths if p}
    if len(firsts) != 1 or any(len(p) < 3 for p in paths):
        return None
    first = next(iter(firsts))
    return first if model_name is None or first == model_name else None


def config_layers(model_config) -> dict:
    """{layer name: (class name, trainable flag)} for every layer (and model) in a Keras
    model config, nested models included."""
    out = {}

    def walk(node):
        if isinstance(node, dict):
            cfg = node.get("config")
            if isinstance(node.get("class_name"), str) and isinstance(cfg, dict) and "name" in cfg:
                out.setdefault(cfg["name"], (node["class_name"], cfg.get("trainable", True)))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(model_config or {})
    return out


def _frozen_param(path, by_name) -> bool:
    """Whether non-trainable variable ``path`` (layer names..., variable) is a param of a
    frozen layer (``layer.trainable = False``): a layer on its path is frozen and its owning
    layer's class lists the variable as trainable (the .keras reader's rule)."""
    owners = [by_name.get(str(p)) for p in path[:-1]]
    if not owners or owners[-1] is None or not any(o and o[1] is False for o in owners):
        return False
    return str(path[-1]) in layer_tables.trainable_names(owners[-1][0])


def _weight(leaf, shape, dtype, prefix, by_name):
    path = list(leaf.keys[1:])
    frozen = leaf.keys[0] == "non_trainable_variables" and _frozen_param(path, by_name)
    if prefix is not None:
        path = path[1:]
    name = "/".join(map(str, path))
    role = "param" if leaf.keys[0] == "trainable_variables" or frozen else "state"
    return Entry(name, shape, dtype, role, key=leaf.key, layer="/".join(map(str, path[:-1])),
                 frozen=frozen)


def _slot(var, params, slots):
    """(param, slot) when optimizer variable ``var`` is a slot of one of ``params``
    (underscored Keras path -> canonical name); the longest matching path wins."""
    best = None
    for under, canon in params.items():
        if var.startswith(under + "_"):
            slot = var[len(under) + 1:]
            if (slots is None or slot in slots) and (best is None or len(under) > len(best[0])):
                best = (under, canon, slot)
    return (best[1], best[2]) if best else None


def keras_entries(leaves, meta, model_config):
    """Canonical entries (and the OptimizerInfo) of a Keras state tree.

    ``meta`` maps a leaf's key to (shape, dtype)."""
    model_name = (model_config or {}).get("config", {}).get("name")
    prefix = model_prefix(leaves, model_name)
    weights, params, by_name = [], {}, config_layers(model_config)
    for leaf in leaves:
        if leaf.keys[0] in GROUPS[:2]:
            e = _weight(leaf, *meta[leaf.key], prefix, by_name)
            weights.append(e)
            if e.role == "param" and not e.frozen:
                params["_".join(map(str, leaf.keys[1:]))] = e.name
    opt_entries, info = _optimizer(leaves, meta, params, model_config)
    metrics = [Entry("/".join(map(str, leaf.keys)), *meta[leaf.key], "state", key=leaf.key,
                     layer=METRICS) for leaf in leaves if leaf.keys[0] == METRICS]
    return weights + opt_entries + metrics, info


def _opt_config(model_config):
    opt = ((model_config or {}).get("compile_config") or {}).get("optimizer")
    if isinstance(opt, str):
        return opt, {}
    if isinstance(opt, dict):
        return opt.get("class_name"), opt.get("config") or {}
    return None, {}


def _optimizer(leaves, meta, params, model_config):
    oleaves = [leaf for leaf in leaves if leaf.keys[0] == "optimizer_variables"]
    if not oleaves:
        return [], None
    stored = str(oleaves[0].keys[1]) if len(oleaves[0].keys) > 2 else ""
    cls, cfg = _opt_config(model_config)
    cls = cls or class_from_storage_name(stored)
    layout = layout_for(cls, cfg) if cls else None
    slots = set(layout.slots) if layout else None
    out = []
    for leaf in oleaves:
        var = "/".join(map(str, leaf.keys[2:]))
        bound = _slot(var, params, slots)
        if bound:
            param, slot = bound
            out.append(Entry(slot_name(param, slot), *meta[leaf.key], "slot", slot_of=param,
                             slot=slot, key=leaf.key, layer=param.rsplit("/", 1)[0] if "/" in param else ""))
        else:
            out.append(Entry(f"optimizer/{var}", *meta[leaf.key], "optimizer", key=leaf.key))
    return out, OptimizerInfo(stored, cls, cfg)


def generic_entries(leaves, meta):
    """Any other PyTree (JAX/Flax): every leaf a param named by its path."""
    return [Entry("/".join(map(str, leaf.keys)), *meta[leaf.key], "param", key=leaf.key,
                  layer="/".join(map(str, leaf.keys[:-1]))) for leaf in leaves]


def keras_key(entry_name, role, model_prefix_name, opt_name, slot_of=None, slot=None, frozen=False):
    """The state-tree keys (a tuple) Keras uses for a canonical entry (convert to Orbax)."""
    pre = (model_prefix_name,) if model_prefix_name else ()
    if role in ("param", "state"):
        group = "trainable_variables" if role == "param" and not frozen else "non_trainable_variables"
        return (group, *pre, *entry_name.split("/"))
    if role == "slot":
        under = "_".join((*pre, *slot_of.split("/")))
        return ("optimizer_variables", opt_name, f"{under}_{slot}")
    return ("optimizer_variables", opt_name, entry_name.split("/", 1)[1])
