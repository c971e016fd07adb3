"""Output shapes of a model's layers, computed by Keras (used when the config lacks them)."""
from __future__ import annotations

import copy
import warnings

from surgeon.core.tf import import_keras_light
from surgeon.core.errors import SurgeonError


def keras_output_shapes(model_json: dict, label) -> dict:
    """{layer name: output shape tuple} of the model described by ``model_json``."""
    keras = import_keras_light()
    cfg = copy.deepcopy(model_json)
    cfg["compile_config"] = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = keras.saving.deserialize_keras_object(cfg, safe_mode=True)
    except Exception as exc:
        raise SurgeonError(f"{label}: Keras cannot rebuild the model to infer shapes: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    out = {}
    for layer in model.layers:
        try:
            out[layer.name] = tuple(layer.output.shape)
        except (AttributeError, ValueError):
            continue
    return out
