"""Canonical names for a live Keras 3 model's variables and its optimizer's variables.

Model variables are named by walking the model exactly as Keras' own saver does
(``saving_lib._save_state`` with a recording store): that walk yields each variable's
storage key (``layers/conv2d/vars/0``) and the chain of object names above it, from which
the canonical name follows (``conv1/kernel``, nested ``backbone/fc1/kernel``, LSTM
``lstm/lstm_cell/kernel``) -- the same rule the readers use. Optimizer variables are
bound through surgeon's optimizer layout (the order Keras builds them in) and each
binding is checked against the slot variable's own Keras name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from surgeon.core.tf import tf_module
from surgeon.binding import optimizers
from surgeon.core.errors import BindingError
from surgeon.core.tree import slot_name


@dataclass
class VarMap:
    """name -> live variable, for the model and the optimizer."""

    model: dict = field(default_factory=dict)  # canonical name -> keras Variable
    keys: dict = field(default_factory=dict)  # storage key -> canonical name
    trainable: list = field(default_factory=list)  # canonical names, trainable order
    optimizer: dict = field(default_factory=dict)  # canonical name -> keras Variable
    slots: dict = field(default_factory=dict)  # param name -> {slot: Variable}


def _recording_store():
    saving_lib = tf_module("keras.src.saving.saving_lib")

    class Recorder(saving_lib.H5IOStore):
        """Stands in for the H5 store: records what Keras would save, and where."""

        def __init__(self):  # no file behind it
            self.vars, self.names, self.current = {}, {}, ""

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            self.current = path
            self.names[path] = (metadata or {}).get("name")
            return self

        def __setitem__(self, key, value):
            prefix = f"{self.current}/vars" if self.current else "vars"
            self.vars[f"{prefix}/{key}"] = value

    return Recorder()


def _canonical_layer(path, names):
    if not path:  # the model's own add_weight variables: bare names, as the readers list them
        return ""
    parts, prefix = [], []
    for piece in path.split("/"):
        prefix.append(piece)
        name = names.get("/".join(prefix))
        if name:
            parts.append(name)
    return "/".join(parts)


def model_variables(model) -> tuple[dict, dict]:
    """({canonical name: Variable}, {storage key: canonical name}) for ``model``."""
    saving_lib = tf_module("keras.src.saving.saving_lib")
    store = _recording_store()
    skip = {id(model.optimizer)} if getattr(model, "optimizer", None) is not None else set()
    saving_lib._save_state(model, store, None, "", skip)
    by_name, keys = {}, {}
    for key, var in store.vars.items():
        layer_path = key.rsplit("/vars/", 1)[0] if "/vars/" in key else ""
        canon = _canonical_layer(layer_path, store.names)
        vname = getattr(var, "name", None)
        if vname is not None:  # Keras forbids "/" in a variable's own name; a model built
            vname = vname.rsplit("/", 1)[-1]  # twice in a process reads 'sub_1/scale'
        if vname is None or not hasattr(var, "assign"):
            raise BindingError(f"{key}: layer saves a computed value, not a variable; "
                               "surgeon cannot restore it in place")
        name = f"{canon}/{vname}" if canon else vname
        if name in by_name:
            raise BindingError(f"two model variables map to the canonical name {name!r}")
        by_name[name], keys[key] = var, name
    return by_name, keys


def optimizer_variables(optimizer, trainable_names, trainable_vars) -> tuple[dict, dict]:
    """({canonical name: Variable}, {param: {slot: Variable}}) for a built optimizer."""
    cls = type(optimizer).__name__
    layout = optimizers.layout_for(cls, optimizer.get_config())
    if layout is None:
        raise BindingError(f"optimizer {cls} has no known slot layout in surgeon")
    variables = list(optimizer.variables)
    out, slots = {}, {}
    rest = variables
    for gname in ("iteration", "learning_rate"):
        if rest and rest[0].name == gname:
            out[f"optimizer/{gname}"] = rest[0]
            rest = rest[1:]
    for gname in reversed(layout.trailing):  # Nadam's u_product: an unnamed scalar ("variable")
        if rest and (rest[-1].name == gname or tuple(rest[-1].shape) == ()):
            out[f"optimizer/{gname}"] = rest[-1]
            rest = rest[:-1]
    order = layout.order(trainable_names)
    if len(order) != len(rest):
        raise BindingError(f"optimizer {cls} holds {len(rest)} slot variables, its layout "
                           f"predicts {len(order)}; this Keras version lays it out differently")
    ref = dict(zip(trainable_names, trainable_vars))
    for (param, slot), var in zip(order, rest):
        expected = f"{ref[param].path.replace('/', '_')}_{slot}"
        if layout.slot_shape(slot, ref[param].shape) != tuple(ref[param].shape):
            expected = ref[param].name  # Adafactor's factored r/c carry the param's name
        if var.name != expected or tuple(var.shape) != layout.slot_shape(slot, ref[param].shape):
            raise BindingError(f"optimizer variable {var.name!r} does not match {param}/{slot} "
                               f"(expected {expected!r}); layout mismatch")
        out[slot_name(param, slot)] = var
        slots.setdefault(param, {})[slot] = var
    return out, slots


def map_model(model) -> VarMap:
    """The complete canonical map of a compiled, built model and its optimizer."""
    vm = VarMap()
    vm.model, vm.keys = model_variables(model)
    ids = {id(v): n for n, v in vm.model.items()}
    tvars = list(model.trainable_variables)
    missing = [v.path for v in tvars if id(v) not in ids]
    if missing:
        raise BindingError(f"trainable variables not reached by the saver walk: {missing[:3]}")
    vm.trainable = [ids[id(v)] for v in tvars]
    if getattr(model, "optimizer", None) is not None:
        vm.optimizer, vm.slots = optimizer_variables(model.optimizer, vm.trainable, tvars)
    return vm
