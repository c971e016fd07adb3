"""Map Keras 3's H5 weights layout (``layers/<storage>/vars/<i>``) to canonical entries.

Used by the ``.keras``, ``.weights.h5`` and sharded ``.weights.json`` readers. Reads
only the H5 structure (names, shapes, dtypes, attrs), never tensor data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from surgeon.binding import keras3 as binding, layers, optimizers
from surgeon.core.tree import Entry, OptimizerInfo, slot_name
from .h5tree import DS, Node


@dataclass
class Obj:
    """A saveable Keras object (layer, model, cell) found in the H5 file."""

    path: str
    name: str
    canon: str
    cls: str | None
    config: dict | None
    trainable: bool
    var_keys: list = field(default_factory=list)
    children: list = field(default_factory=list)


def _numeric_keys(group):
    keys = [k for k in group.keys() if isinstance(group[k], DS)]
    return sorted(keys, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def _join(*parts):
    return "/".join(p for p in parts if p)


def _dtype(ds) -> str:
    if ds.attrs.get("dtype", None) == "bfloat16":
        return "bfloat16"
    return str(ds.dtype)


def _child_objects(group, path):
    """(attr key, storage path, group) for every object below ``group`` (containers flattened)."""
    out = []
    for key in group.keys():
        if key == "vars" or (not path and key == "optimizer"):
            continue
        sub = group[key]
        if not isinstance(sub, Node):
            continue
        sub_path = _join(path, key)
        if "vars" in sub:
            out.append((key, sub_path, sub))
        else:
            out.extend(_child_objects(sub, sub_path))
    return out


def _layer_configs(cls, cfg):
    """name -> (class, config) for the layers of a model config, in model order."""
    if cls not in layers.MODEL_CLASSES or not cfg:
        return None
    out = {}
    for item in cfg.get("layers", []):
        c = item.get("config", {})
        out[c.get("name", item.get("name"))] = (item.get("class_name"), c)
    return out


def _sub_class(parent_cls, parent_cfg, key, name):
    """Class and config of a sublayer (an LSTM's cell, a Bidirectional's forward_layer)."""
    table = dict(layers.SUBLAYERS.get(parent_cls, ()))
    if table.get(key):
        return table[key], None
    if key in table:
        pc = parent_cfg or {}
        wrapped = (pc.get("backward_layer") if key == "backward_layer" else None) or pc.get("layer")
        if wrapped:
            return wrapped.get("class_name"), wrapped.get("config")
    guess = layers.class_from_storage(key) or layers.class_from_storage(layers.to_snake_case(name))
    return guess, None


def _order_children(cls, children, known):
    if known is not None:
        rank = {n: i for i, n in enumerate(known)}
        return sorted(children, key=lambda c: rank.get(c[3], len(rank)))
    attrs = [a for a, _ in layers.SUBLAYERS.get(cls, ())]
    return sorted(children, key=lambda c: (attrs.index(c[0]) if c[0] in attrs else len(attrs)))


def build_objects(group, path, canon, cls, cfg, trainable, with_config):
    """Recursively build the object tree in Keras' trainable-variable order."""
    name = group["vars"].attrs.get("name", "") if "vars" in group else ""
    obj = Obj(path, name, canon, cls, cfg, trainable)
    if "vars" in group:
        obj.var_keys = [_join(path, "vars", k) for k in _numeric_keys(group["vars"])]
    layer_cfgs = _layer_configs(cls, cfg) if with_config else None
    kids = []
    for key, sub_path, sub in _child_objects(group, path):
        kname = sub["vars"].attrs.get("name", key)
        kname = str(kname)
        kids.append((key, sub_path, sub, kname))
    for key, sub_path, sub, kname in _order_children(cls, kids, list(layer_cfgs) if layer_cfgs else None):
        if layer_cfgs is not None and kname in layer_cfgs:
            kcls, kcfg = layer_cfgs[kname]
        elif with_config:
            kcls, kcfg = _sub_class(cls, cfg, key, kname)
        else:
            kcls, kcfg = _sub_class(cls, None, key, kname)
        ktrain = trainable and (kcfg or {}).get("trainable", True)
        obj.children.append(build_objects(
            sub, sub_path, _join(canon, kname), kcls, kcfg, ktrain, with_config))
    return obj


def walk(obj):
    yield obj
    for c in obj.children:
        yield from walk(c)


def layer_entries(h5, root, with_config):
    """Entries for every model variable, and the trainable order [(name, shape)]."""
    entries, trainable, candidates, certain = [], [], [], True
    for obj in walk(root):
        if not obj.var_keys:
            continue
        names = layers.var_names(obj.cls, obj.config if with_config else None, len(obj.var_keys))
        for key, (vname, is_trainable, sure) in zip(obj.var_keys, names):
            ds = h5[key]
            name = _join(obj.canon, vname)
            role = "param" if is_trainable else "state"
            e = Entry(name, tuple(ds.shape), _dtype(ds), role, key=key, layer=obj.canon,
                      frozen=role == "param" and not obj.trainable)
            entries.append(e)
            certain = certain and sure
            if role == "param":
                candidates.append((name, e.shape))
                if obj.trainable:
                    trainable.append((name, e.shape))
    return entries, trainable, candidates, certain


def optimizer_entries(h5, opt_cfg, trainable, candidates, exact, read_key):
    """Entries for ``optimizer/vars/*`` plus OptimizerInfo and binding notes."""
    if "optimizer" not in h5 or "vars" not in h5["optimizer"]:
        return [], None, []
    g = h5["optimizer/vars"]
    storage_name = g.attrs.get("name", "optimizer")
    storage_name = str(storage_name)
    ovars = [binding.OptVar(i, f"optimizer/vars/{k}", tuple(g[k].shape), _dtype(g[k]))
             for i, k in enumerate(_numeric_keys(g))]
    cls = (opt_cfg or {}).get("class_name") or optimizers.class_from_storage_name(storage_name)
    cfg = (opt_cfg or {}).get("config", {})
    layout = optimizers.layout_for(cls, cfg) if (opt_cfg and cls) else None
    if layout is not None and exact:
        b = binding.bind_exact(ovars, trainable, layout)
    else:
        layouts = [layout] if layout else optimizers.candidate_layouts(storage_name)
        b = binding.bind_guess_free(ovars, candidates, layouts)
    info = OptimizerInfo(name=storage_name, class_name=cls, config=cfg)
    entries = []
    for v in ovars:
        if v.index in b.globals:
            gname = b.globals[v.index]
            entries.append(Entry(f"optimizer/{gname}", v.shape, v.dtype, "optimizer", key=v.key))
            if gname in ("iteration", "learning_rate"):
                value = read_key(v.key)[()]
                setattr(info, "iterations" if gname == "iteration" else gname,
                        int(value) if gname == "iteration" else float(value))
        elif v.index in b.slots:
            p, s = b.slots[v.index]
            entries.append(Entry(slot_name(p, s), v.shape, v.dtype, "slot", slot_of=p, slot=s,
                                 key=v.key, layer=p.rsplit("/", 1)[0]))
        else:
            entries.append(Entry(f"optimizer/unresolved/{v.index}", v.shape, v.dtype, "slot",
                                 key=v.key))
    return entries, info, b.notes
