"""Build a Keras 3 *skeleton* of a conversion target: the model, compiled with the source's
optimizer, the optimizer built, saved by Keras itself in the target format.

Only Keras writes the layout Keras will read back, so surgeon lets Keras write an empty
copy and then fills every tensor from the source losslessly. Configs come from files, so
they are data: a Lambda layer (marshalled Python bytecode) is refused, never executed.

For ``.keras`` and ``.weights.h5`` targets Keras is only asked for configs and a layout:
it runs on its light backend when the CLI allows it (``import_keras_light``: TensorFlow
never loads) and builds the model without weight values (:mod:`~surgeon.convert.lazy`).
The other targets need Keras on TensorFlow (``convert`` loads it first, see
``needs_tensorflow``); every function here uses the Keras already loaded.
"""
from __future__ import annotations

import copy
import importlib
import json
import re
import warnings
from pathlib import Path

from surgeon.core.tf import import_keras_light, import_tf, light_module
from surgeon.core.errors import SurgeonError
from surgeon.convert import lazy as lazy_mod

# Targets whose skeleton Keras writes through its H5 weight store (lazily, on any backend).
LAZY_FORMATS = ("keras", "keras-weights-h5")


def needs_tensorflow(fmt) -> bool:
    """Whether writing ``fmt``'s skeleton needs Keras on TensorFlow (TF checkpoints,
    Orbax, legacy H5 through Keras' legacy saver)."""
    return fmt not in LAZY_FORMATS

# Arguments Keras 3 removed, dropped from legacy configs before deserialising.
REMOVED_ARGS = {"Embedding": ("input_length",), "LSTM": ("time_major",), "GRU": ("time_major",),
                "SimpleRNN": ("time_major",), "Bidirectional": ("time_major",)}
_UNKNOWN_ARGS = (re.compile(r"Unrecognized keyword arguments passed to (\w+): \{(.*)\}"),
                 re.compile(r"Argument\(s\) not recognized: \{(.*)\}"),
                 re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'"))
_OPT_RENAMES = {"lr": "learning_rate"}


def find_lambda(config, where="model"):
    """The name of the first Lambda layer (or marshalled function) in ``config``, or None."""
    if isinstance(config, dict):
        if config.get("class_name") == "Lambda":
            c = config.get("config") or {}
            return c.get("name") or config.get("name") or "lambda"
        for v in config.values():
            hit = find_lambda(v, where)
            if hit:
                return hit
    elif isinstance(config, list):
        for v in config:
            hit = find_lambda(v, where)
            if hit:
                return hit
    return None


def _layer_dicts(config):
    """Every {'class_name', 'config'} dict in a (nested) model config."""
    if isinstance(config, dict):
        if "class_name" in config and isinstance(config.get("config"), dict):
            yield config
        for v in config.values():
            yield from _layer_dicts(v)
    elif isinstance(config, list):
        for v in config:
            yield from _layer_dicts(v)


def _drop(config, cls, keys, dropped):
    for d in _layer_dicts(config):
        if cls is None or d["class_name"] == cls:
            for k in keys:
                if k in d["config"]:
                    d["config"].pop(k)
                    dropped.append(f"{d['class_name']}.{k} of {d['config'].get('name', '?')}")


def _unknown_args(message):
    for pat in _UNKNOWN_ARGS:
        m = pat.search(message)
        if m and len(m.groups()) == 2 and pat is _UNKNOWN_ARGS[0]:
            return m.group(1), re.findall(r"'(\w+)':", m.group(2))
        if m and pat is _UNKNOWN_ARGS[1]:
            return None, re.findall(r"'(\w+)':", m.group(1))
        if m:
            return m.group(1), [m.group(2)]
    return None, []


def _sequential_input(config, dropped):
    """Keras 2 Sequential: first layer's ``batch_input_shape`` -> an explicit InputLayer."""
    if config.get("class_name") != "Sequential":
        return
    cfg = config.get("config")
    if isinstance(cfg, list):  # Keras 2.0/2.1 list form
        cfg = config["config"] = {"name": "sequential", "layers": cfg}
    items = cfg.get("layers") or []
    if not items or items[0].get("class_name") == "InputLayer":
        return
    first = items[0].get("config") or {}
    shape = first.pop("batch_input_shape", None)
    if shape is None:
        return
    first.pop("input_dim", None) if items[0].get("class_name") != "Embedding" else None
    items.insert(0, {"class_name": "InputLayer", "config": {
        "batch_shape": shape, "dtype": first.get("dtype", "float32"),
        "name": f"{first.get('name', 'layer')}_input"}})
    dropped.append(f"batch_input_shape of {first.get('name', '?')} (now an InputLayer)")


def model_from_config(config, label):
    """Deserialise a (legacy or Keras 3) model config; returns (model, notes)."""
    name = find_lambda(config)
    if name:
        raise SurgeonError(f"{label}: model config holds a Lambda layer ({name}) with stored "
                           "Python code, which surgeon never executes; pass --like MODEL.keras "
                           "or --like module:function to give the model structure")
    keras = import_keras_light()
    saving_utils = light_module("keras.src.legacy.saving.saving_utils")
    config = copy.deepcopy(config)
    dropped = []
    _sequential_input(config, dropped)
    for cls, keys in REMOVED_ARGS.items():
        _drop(config, cls, keys, dropped)
    for _ in range(20):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if "module" in config:
                    model = lazy_mod.build_lazily(
                        lambda: keras.saving.deserialize_keras_object(copy.deepcopy(config)))
                else:
                    model = lazy_mod.build_lazily(
                        lambda: saving_utils.model_from_config(copy.deepcopy(config)))
            notes = [f"config upgraded for Keras 3: dropped {d}" for d in dropped]
            return model, notes
        except (ValueError, TypeError) as exc:
            cls, keys = _unknown_args(str(exc))
            before = len(dropped)
            if keys:
                _drop(config, cls, keys, dropped)
            if len(dropped) == before:
                raise SurgeonError(f"{label}: Keras 3 cannot rebuild the model from its config: "
                                   f"{str(exc).splitlines()[0]}; pass --like MODEL") from None
    raise SurgeonError(f"{label}: Keras 3 cannot rebuild the model from its config")


def check_like(like):
    """``--like`` names an existing file or a ``module:function`` (no import)."""
    if ":" not in str(like) and not Path(like).exists():
        raise SurgeonError(f"--like {like}: no such file (expected MODEL.keras or module:function)")


def model_from_like(like):
    """A Keras model from ``--like``: a ``.keras`` file or ``module:function``."""
    check_like(like)
    keras = import_keras_light()
    if ":" in str(like) and not Path(like).exists():
        mod, _, fn = str(like).partition(":")
        try:
            obj = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise SurgeonError(f"--like {like}: cannot import: {exc}") from None
        model = obj() if callable(obj) else obj
        if not isinstance(model, keras.Model):
            raise SurgeonError(f"--like {like}: did not return a keras.Model")
        return model, None
    if not Path(like).exists():
        raise SurgeonError(f"--like {like}: no such file (expected MODEL.keras or module:function)")
    from surgeon.formats.keras_zip import read_zip_json
    config = read_zip_json(like, "config.json")
    model, _ = model_from_config({k: config[k] for k in ("class_name", "config", "module",
                                                         "registered_name", "build_config")
                                  if k in config},
                                 f"--like {like}")
    return model, config.get("compile_config")


def optimizer_from(class_name, config, label):
    """A Keras 3 optimizer from a (possibly Keras 2) optimizer class and config; (opt, notes)."""
    import inspect
    keras = import_keras_light()
    cls = getattr(keras.optimizers, class_name or "", None)
    if cls is None or not isinstance(cls, type):
        raise SurgeonError(f"{label}: optimizer {class_name!r} has no Keras 3 equivalent; "
                           "use --optimizer drop")
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    allowed |= set(inspect.signature(keras.optimizers.Optimizer.__init__).parameters)
    cfg, notes = {}, []
    for k, v in (config or {}).items():
        k2 = _OPT_RENAMES.get(k, k)
        if k2 in allowed and k2 not in ("kwargs", "self"):
            cfg[k2] = v
        elif k not in ("name", "is_legacy_optimizer") and v not in (0, 0.0, None, False):
            notes.append(f"optimizer argument {k}={v} has no Keras 3 equivalent; dropped")
    # the class's own default name ("adam"): an auto name (name=None, Keras 3's default)
    # would be uniquified per process ("adam_1" on a second convert: different bytes)
    default = inspect.signature(cls.__init__).parameters.get("name")
    cfg["name"] = default.default if default and isinstance(default.default, str) else \
        _snake_case(cls.__name__)
    try:
        return cls.from_config(cfg), notes  # from_config also rebuilds learning-rate schedules
    except (TypeError, ValueError) as exc:
        raise SurgeonError(f"{label}: cannot create Keras 3 {class_name}: {exc}") from None


def _snake_case(name):
    """Keras' ``to_snake_case`` (its auto name's prefix): ``Adam`` -> ``adam``."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _loss(loss):
    keras = import_keras_light()
    if isinstance(loss, str):
        try:
            fn = keras.losses.get(loss)  # aliases ("mse") -> full names, which every
            return getattr(fn, "__name__", loss)  # Keras loader (legacy H5 too) accepts
        except (ValueError, TypeError):
            return None
    if isinstance(loss, dict):
        try:
            return keras.losses.deserialize(loss)
        except (ValueError, TypeError):
            return None
    return None


def compile_and_save(model, opt, loss, fmt, tmpdir, max_shard_size=None):
    """Compile ``model`` with ``opt`` (or not, if None), build it, save in ``fmt``
    (``max_shard_size``: GB per shard of a sharded ``.weights.json``): (skeleton path, model
    path naming it or None, ``LazyValues`` of its empty datasets)."""
    if opt is not None:
        model.compile(optimizer=opt, loss=loss, jit_compile=lazy_mod.jit_compile_as_tensorflow())
        lazy_mod.build_lazily(lambda: opt.build(model.trainable_variables))
    tmpdir = Path(tmpdir)
    lazy = lazy_mod.LazyValues()
    try:
        if fmt not in LAZY_FORMATS:
            return (*_save(model, fmt, tmpdir, max_shard_size), lazy)
        with lazy_mod.recording(lazy):
            return (*_save(model, fmt, tmpdir, max_shard_size), lazy)
    except SurgeonError:
        raise
    except Exception as exc:  # noqa: BLE001 - Keras refuses to write this model in fmt
        raise SurgeonError(f"Keras cannot write this model ({model.__class__.__name__}) as "
                           f"{fmt}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                           "; choose another output format (.keras)") from None


def _save(model, fmt, tmpdir, max_shard_size=None):
    keras_path = tmpdir / "skeleton.keras"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(keras_path)
        if fmt == "keras":
            return keras_path, None
        if fmt == "orbax":
            return _orbax_skeleton(model, tmpdir / "skeleton.orbax"), None
        if fmt == "keras-weights-h5":
            out = tmpdir / "skeleton.weights.h5"
            model.save_weights(out)
            return out, keras_path
        if fmt == "keras-weights-sharded":
            out = tmpdir / "skeleton.weights.json"
            model.save_weights(out, max_shard_size=max_shard_size)
            return out, keras_path
        if fmt == "legacy-h5":
            out = tmpdir / "skeleton.h5"
            model.save(out)
            return out, None
    if fmt == "tf-checkpoint":
        tf = import_tf()
        objs = {"model": model} | ({"optimizer": model.optimizer}
                                  if getattr(model, "optimizer", None) is not None else {})
        # the .keras twin names the checkpoint's nested models (not recorded in it)
        return Path(tf.train.Checkpoint(**objs).write(str(tmpdir / "skeleton"))), keras_path
    raise SurgeonError(f"cannot write format {fmt!r}")


def _orbax_skeleton(model, root):
    """The layout Keras' own ``OrbaxCheckpoint`` callback writes for ``model`` (step 0)."""
    keras = import_keras_light()
    try:
        cb = keras.callbacks.OrbaxCheckpoint(str(root.resolve()), save_on_background=False)
    except ImportError:
        from surgeon.formats.orbax_layout import INSTALL
        raise SurgeonError(f"writing Orbax checkpoints needs orbax-checkpoint: {INSTALL}") from None
    cb.set_model(model)
    cb._save_checkpoint(step=0)
    cb.on_train_end()
    return root


def model_json(model):
    return json.loads(model.to_json())
