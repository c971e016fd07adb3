"""Map Keras 3's H5 weights layout (``layers/<storage>/vars/<i>``) to canonical entries.

Used by the ``.keras``, ``.weights.h5`` and sharded ``.weights.json`` readers. Reads
only the H5 structure (names, shapes, dtypes, attrs), never tensor data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from surgeon.binding import keras3 as binding, layers, optimizers, quantized
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


def unknown_layers(root):
    """Objects storing variables whose class surgeon has no table for (custom layers,
    subclassed models): their variable names and roles are not in the file."""
    return [o for o in walk(root) if o.var_keys and not layers.max_vars(o.cls)
            and o.cls not in quantized.SPECS]


def _names(h5, obj, with_config, notes, known=None):
    """``[(name, trainable, certain, quant, frozen)]`` for an object's stored variables;
    ``known`` (from :mod:`keras_classes`) names them as Keras does."""
    n = len(obj.var_keys)
    if known is not None and len(known.by_path.get(obj.path, ())) == n:
        return [(nm, role != "state", True, "", role == "frozen")
                for nm, role in known.by_path[obj.path]]
    cfg = obj.config if with_config else None
    mode = quantized.mode_of(cfg)
    ints = [k for k in obj.var_keys if h5[k].dtype.kind in "iu"]
    if mode is None and not with_config and obj.cls in quantized.SPECS and (
            ints or n > layers.max_vars(obj.cls)):
        mode = "unknown"  # integer or extra variables without a config: quantized, layout unknown
    if mode is None:
        # LoRA (enable_lora): Keras saves the merged kernel; the base kernel is frozen
        lora = {"kernel", "embeddings"} if (cfg or {}).get("lora_rank") else set()
        return [(nm, tr, sure, "", nm in lora)
                for nm, tr, sure in layers.var_names(obj.cls, cfg, n)]
    named = quantized.names(obj.cls, cfg, mode, n)
    if named is None:
        what = (f"{mode}-quantized {obj.cls or 'layer'} with a variable layout surgeon does "
                f"not know ({n} variables)" if mode != "unknown" else
                f"{obj.cls} storing {n} variables, quantized (no model config: pass --model)")
        notes.append(f"layer {obj.canon or '(model)'}: {what}; listed by position as "
                     "quantized state, which ops and convert refuse")
        named = quantized.unknown(n, mode)
    return [(nm, tr, True, q, False) for nm, tr, q in named]


def layer_entries(h5, root, with_config, notes=None, known=None):
    """Entries for every model variable, and the trainable order [(name, shape)] (Keras'
    own order when ``known`` gives it)."""
    entries, trainable, candidates, certain = [], [], [], True
    notes = [] if notes is None else notes
    for obj in walk(root):
        if not obj.var_keys:
            continue
        names = _names(h5, obj, with_config, notes, known)
        for key, (vname, is_trainable, sure, quant, frozen) in zip(obj.var_keys, names):
            ds = h5[key]
            name = _join(obj.canon, vname)
            role = "param" if is_trainable else "state"
            frozen = role == "param" and (frozen or not obj.trainable)
            e = Entry(name, tuple(ds.shape), _dtype(ds), role, key=key, layer=obj.canon,
                      frozen=frozen, quant=quant)
            entries.append(e)
            certain = certain and sure
            if role == "param":
                candidates.append((name, e.shape))
                if not frozen:
                    trainable.append((name, e.shape))
    if known is not None:
        by_key = {e.key: e for e in entries}
        trainable = [(by_key[k].name, by_key[k].shape) for k in (
            _join(path, "vars", str(i)) for path, i in known.trainable)]
    return entries, trainable, candidates, certain


def _ovars(h5, path):
    g = h5[path]
    return [binding.OptVar(i, f"{path}/{k}", tuple(g[k].shape), _dtype(g[k]))
            for i, k in enumerate(_numeric_keys(g))]


# LossScaleOptimizer's own variables, in Keras' order (before the inner optimizer's).
WRAPPER_VARS = ("iteration", "learning_rate", "step_counter", "dynamic_scale")


def optimizer_entries(h5, opt_cfg, trainable, candidates, exact, read_key):
    """Entries for ``optimizer/vars/*`` plus OptimizerInfo and binding notes.

    A ``LossScaleOptimizer`` (mixed precision) stores its inner optimizer twice: under
    ``optimizer/inner_optimizer/vars`` and again after its own four variables in
    ``optimizer/vars``. Keras loads the inner copy last, so it is the one listed (its
    iteration counter, learning rate and slots are the optimizer's); the outer copy is
    recorded as a mirror every writer keeps equal. The wrapper's loss scale and step
    counter are listed as ``optimizer/loss_scale/*``.
    """
    if "optimizer" not in h5 or "vars" not in h5["optimizer"]:
        return [], None, []
    inner = "inner_optimizer" in h5["optimizer"] and "vars" in h5["optimizer/inner_optimizer"]
    path = "optimizer/inner_optimizer/vars" if inner else "optimizer/vars"
    entries, info, notes = _bound_entries(h5, path, opt_cfg, trainable, candidates, exact,
                                          read_key)
    if inner:
        entries = _wrapper(h5, entries, info, notes, read_key)
    return entries, info, notes


def _wrapper(h5, entries, info, notes, read_key):
    outer = _ovars(h5, "optimizer/vars")
    own = len(outer) - len(entries)
    inner_keys = [e.key for e in entries]
    fits = own == len(WRAPPER_VARS) and all(v.shape == () for v in outer[:own]) and all(
        tuple(h5[k].shape) == v.shape for k, v in zip(inner_keys, outer[own:]))
    info.wrapper = str(h5["optimizer/vars"].attrs.get("name", "loss_scale_optimizer"))
    if not fits:
        notes.append(f"optimizer wrapper {info.wrapper}: {len(outer)} variables do not follow "
                     "LossScaleOptimizer's layout; listed as optimizer/unresolved")
        return entries + [Entry(f"optimizer/unresolved/outer/{v.index}", v.shape, v.dtype, "slot",
                                key=v.key) for v in outer]
    for k, v in zip(inner_keys, outer[own:]):
        info.mirrors[k] = (v.key,)
    out = [Entry(f"optimizer/loss_scale/{n}", v.shape, v.dtype, "optimizer", key=v.key)
           for n, v in zip(WRAPPER_VARS, outer)]
    info.loss_scale = float(read_key(outer[3].key)[()])
    return entries + out


def _bound_entries(h5, path, opt_cfg, trainable, candidates, exact, read_key):
    ovars = _ovars(h5, path)
    storage_name = str(h5[path].attrs.get("name", "optimizer"))
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
    steps = optimizers.accumulation_steps(cfg)
    if steps > 1 and info.iterations is not None:
        b.notes.append(f"gradient accumulation over {steps} steps: the stored counter "
                       f"optimizer/iteration={info.iterations} counts micro-steps; Keras' "
                       f"optimizer.iterations is {info.iterations // steps}")
        info.iterations //= steps
    return entries, info, b.notes
