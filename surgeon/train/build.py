"""Build the Keras 3 model to resume into: from the checkpoint's own config, a ``.keras``
file's config, or a ``module:function`` returning a compiled model.

Only the *structure* and the compile config are taken from Keras: no weights or optimizer
state are loaded by Keras (its optimizer loader is positional and silently skips state
whose layout changed); surgeon restores every tensor itself, by canonical name.
"""
from __future__ import annotations

import json
from pathlib import Path

from surgeon.core.tf import import_keras, tf_module
from surgeon.core.errors import SurgeonError


def _config_of(reader, model_spec):
    if model_spec is None:
        cfg = getattr(reader, "config", None)
        if cfg is None:
            raise SurgeonError(f"{reader.path}: this checkpoint has no model config; pass "
                               "--model MODEL.keras|config.json|module:function")
        return cfg
    p = Path(str(model_spec))
    if p.suffix == ".keras" or p.suffix == ".json":
        from surgeon.formats.keras_h5 import read_model_json
        return read_model_json(p)
    return None


def _from_config(cfg, custom_objects=None, safe_mode=True):
    keras = import_keras()
    try:
        ObjectSharingScope = tf_module("keras.src.saving.serialization_lib").ObjectSharingScope
    except ImportError:  # pragma: no cover - older Keras
        from contextlib import nullcontext as ObjectSharingScope
    if not cfg.get("compile_config"):
        raise SurgeonError("model config has no compile config (no optimizer/loss): pass "
                           "--model module:function returning a compiled model")
    try:
        with ObjectSharingScope():
            return keras.saving.deserialize_keras_object(
                json.loads(json.dumps(cfg)), custom_objects=custom_objects, safe_mode=safe_mode)
    except (TypeError, ValueError, KeyError) as exc:
        raise SurgeonError(f"cannot rebuild the model from its config: {exc}") from None


def build_model(reader, model_spec=None, custom_objects=None):
    """A compiled, built Keras model with a built optimizer (weights not yet restored)."""
    cfg = _config_of(reader, model_spec)
    if cfg is not None:
        model = _from_config(cfg, custom_objects)
    else:
        from .data import load_callable
        model = load_callable(str(model_spec), "--model")()
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", True):
        raise SurgeonError(f"{model_spec or reader.path}: model is not compiled "
                           "(no optimizer/loss); compile it before resuming")
    if not model.built:
        raise SurgeonError(f"{model_spec or reader.path}: model is not built; give it an Input")
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    return model
