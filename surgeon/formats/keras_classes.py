"""Variable names and roles of layers surgeon has no table for (subclassed models, custom
layers), taken from Keras itself when the model's classes are available.

Keras stores a layer's variables as ``vars/0..n-1`` (its ``_trainable_variables`` then its
``_non_trainable_variables``) without their names, and a subclassed model's config holds
no layers. The only source of truth for ``add_weight`` names, frozen layers and
non-trainable variables is the class. When every class of the config is a Keras built-in
or registered in this process (``@keras.saving.register_keras_serializable`` and the
module imported, as ``keras.saving.load_model`` requires), the model is rebuilt from its
config with ``safe_mode=True`` (Keras imports no module of its own choosing), built from
its ``build_config`` and walked with Keras' own saver: every stored variable gets its
Keras name (``add_weight(name=...)``) and its role. Nothing is rebuilt when Keras is not
loaded yet (no class can be registered then): listing a file never loads TensorFlow for it.
"""
from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass, field


@dataclass
class KerasVars:
    """What Keras says about a model's stored variables."""

    # storage path ("" for the model, "body", "layers/dense") -> [(leaf, role)], role one
    # of "param", "frozen", "state"
    by_path: dict = field(default_factory=dict)
    # (storage path, index) of every trainable variable, in model.trainable_variables order
    trainable: list = field(default_factory=list)
    # Keras variable path -> (storage path, index)
    by_keras_path: dict = field(default_factory=dict)
    model_name: str = ""
    # canonical name (layer names from the model down, as the .keras reader names them)
    # -> role
    roles: dict = field(default_factory=dict)


def from_config(model_json) -> KerasVars | None:
    """KerasVars for ``model_json`` (the ``.keras`` config), or None when its classes are
    not available in this process or the model cannot be rebuilt."""
    if not isinstance(model_json, dict) or "keras" not in sys.modules:
        return None
    from surgeon.core.tf import import_keras_light
    keras = import_keras_light()  # whichever Keras is loaded (see the check above)
    config = {k: copy.deepcopy(model_json[k]) for k in ("module", "class_name", "config", "registered_name",
                                         "build_config") if k in model_json}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = keras.saving.deserialize_keras_object(config, safe_mode=True)
            if not model.built:
                return None
    except Exception:  # noqa: BLE001 - an unavailable class, a failing build: no oracle
        return None
    return _walk(model)


def _walk(model):
    from surgeon.core.tf import light_module
    saving_lib = light_module("keras.src.saving.saving_lib")
    store = _recorder(saving_lib)
    try:
        saving_lib._save_state(model, store, None, "", set())
    except Exception:  # noqa: BLE001 - a layer whose saver needs more than its variables
        return None
    trainable_ids = {id(v) for v in model.trainable_variables}
    created_trainable = {id(v) for layer in model._flatten_layers()
                         for v in getattr(layer, "_trainable_variables", [])}
    out = KerasVars(model_name=model.name)
    for path, values in store.recorded.items():
        if path.split("/", 1)[0] == "optimizer":
            continue
        rows = []
        for i in range(len(values)):
            v = values.get(str(i))
            if not hasattr(v, "path"):
                return None  # a computed value (e.g. a merged LoRA kernel): no name
            role = ("param" if id(v) in trainable_ids else
                    "frozen" if id(v) in created_trainable else "state")
            rows.append((v.name.rsplit("/", 1)[-1], role))  # 'sub_1/scale' when rebuilt twice
            out.by_keras_path[v.path] = (path, i)
        out.by_path[path] = rows
        layer = _canon(store.names, path)
        for leaf, role in rows:
            out.roles[f"{layer}/{leaf}" if layer else leaf] = role
    out.trainable = [out.by_keras_path.get(v.path) for v in model.trainable_variables]
    return None if None in out.trainable else out


def _recorder(saving_lib):
    """An ``H5IOStore`` (Keras checks the type) that records what each object would store."""

    class Recorder(saving_lib.H5IOStore):
        def __init__(self):  # noqa: D107 - no file behind it
            self.recorded, self.names = {}, {}

        def make(self, path, metadata=None):
            self.names[path] = (metadata or {}).get("name", path.rsplit("/", 1)[-1])
            self.recorded[path] = {}
            return self.recorded[path]

        def __bool__(self):
            return True

    return Recorder()


def _canon(names, path):
    """The canonical layer path of storage ``path``: the names of the objects above it
    (containers such as ``layers`` hold no variables and add nothing)."""
    if not path:
        return ""
    parts, prefix = [], ""
    for part in path.split("/"):
        prefix = f"{prefix}/{part}" if prefix else part
        if prefix in names:
            parts.append(names[prefix])
    return "/".join(parts)
