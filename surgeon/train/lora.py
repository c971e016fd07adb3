"""LoRA (``layer.enable_lora(rank)``): merge a LoRA model into a plain one, extract an
adapter from a fine-tune, load an adapter into a model by layer path.

Facts (keras/src/layers/core/dense.py, Keras 3.15): the ``.keras``/``.weights.h5`` savers
store the folded kernel ``kernel + (alpha/rank)·A·B`` and no factors; the config keeps
``lora_rank``/``lora_alpha``, so loading re-creates fresh factors (B = 0) while the stored
optimizer slots still describe the old ones; a TF checkpoint holds the factors and the
unfolded kernel.

``merge_lora``: the kernel is folded (from a TF checkpoint: ``kernel + (alpha/rank)·A·B``;
from a ``.keras``: the stored, already folded kernel), ``lora_rank``/``lora_alpha`` leave the
config, the factors' optimizer slots are dropped and the kernel is trainable again with zero
slots (every other slot, the iteration and the learning rate carried over by name).

``extract_lora``: per 2-D kernel (``Dense``, ``Embedding``), the truncated SVD of
``tuned − base``: A = U_r·S_r, B = V_rᵀ, alpha = rank; tensors that differ and cannot be
factored (biases, BatchNorm, conv kernels) are stored whole. The adapter (``.npz``) is keyed
by layer path, never by position; ``load_lora(model, adapter)`` enables LoRA on those layers
of a model built from the base and assigns the factors.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surgeon.core import atomic
from surgeon.core.errors import SurgeonError
from surgeon.core.tf import import_keras

META = "__surgeon_lora__"
FACTORS = {"kernel": ("lora_kernel_a", "lora_kernel_b"),
           "embeddings": ("lora_embeddings_a", "lora_embeddings_b")}


@dataclass
class LoraMergeReport:
    source: str
    output: str
    layers: list = field(default_factory=list)  # [{"layer", "rank", "alpha"}]
    dropped_slots: list = field(default_factory=list)
    zeroed_slots: list = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _strip_lora(obj):
    """The model config with ``lora_rank``/``lora_alpha`` removed from every layer."""
    if isinstance(obj, dict):
        return {k: _strip_lora(v) for k, v in obj.items() if k not in ("lora_rank", "lora_alpha")}
    if isinstance(obj, list):
        return [_strip_lora(v) for v in obj]
    return obj


def _lora_layers(model):
    return [layer for layer in _walk(model) if getattr(layer, "lora_enabled", False)]


def _walk(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _walk(layer)


def _stored_alphas(keras_file) -> dict:
    """{layer name: lora_alpha} as the ``.keras`` config stores it. Keras' loader loses it:
    ``build()`` calls ``enable_lora(rank)``, which resets alpha to the rank (Keras 3.15)."""
    from surgeon.formats.keras_zip import read_zip_json
    out = {}

    def visit(obj):
        if isinstance(obj, dict):
            cfg = obj.get("config")
            if isinstance(cfg, dict) and cfg.get("lora_rank") and cfg.get("name"):
                out[cfg["name"]] = cfg.get("lora_alpha") or cfg["lora_rank"]
            for v in obj.values():
                visit(v)
        elif isinstance(obj, list):
            for v in obj:
                visit(v)
    visit(read_zip_json(keras_file, "config.json"))
    return out


def _live(src, like):
    """The LoRA model with its state: from a ``.keras``, or a TF checkpoint + ``like``."""
    from surgeon.formats import detect
    keras = import_keras()
    fmt = detect(src)
    if fmt == "keras":
        return keras.saving.load_model(src), "stored folded kernel"
    if fmt != "tf-checkpoint":
        raise SurgeonError(f"{src}: lora merge reads a .keras or a TF checkpoint, not {fmt}")
    if like is None:
        raise SurgeonError(f"{src}: a TF checkpoint holds no model config; pass --like "
                           "MODEL.keras (the LoRA model's .keras)")
    model = keras.saving.load_model(like)
    alphas = _stored_alphas(like)
    for layer in _lora_layers(model):
        layer.lora_alpha = alphas.get(layer.name, layer.lora_alpha)
    if model.optimizer is not None:
        model.optimizer.build(model.trainable_variables)
    from surgeon.core.tf import import_tf
    tf = import_tf()
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    from surgeon.formats.tf_bundle import resolve
    prefix = resolve(src)[0]
    try:
        ckpt.read(prefix).assert_existing_objects_matched()
    except (AssertionError, ValueError) as exc:
        raise SurgeonError(f"{src}: does not fit {like}: {str(exc).splitlines()[0]}") from None
    return model, "kernel + (alpha/rank)·A·B"


def merge_lora(src, output, like=None) -> LoraMergeReport:
    """Fold every LoRA adapter of ``src`` into its kernel and write a plain ``.keras``."""
    keras = import_keras()
    output = Path(output)
    if not str(output).endswith(".keras"):
        raise SurgeonError(f"{output}: lora merge writes a .keras (config changes)")
    atomic.check_output(output, [src, like])
    model, how = _live(src, like)
    lora = _lora_layers(model)
    if not lora:
        raise SurgeonError(f"{src}: no layer has LoRA enabled; nothing to merge")
    report = LoraMergeReport(str(src), str(output))
    alphas = _stored_alphas(like or src)
    folded = {}
    for layer in lora:
        attr = "embeddings" if hasattr(layer, "lora_embeddings_a") else "kernel"
        folded[getattr(layer, f"_{attr}").path] = np.asarray(getattr(layer, attr))
        report.layers.append({"layer": layer.name, "rank": int(layer.lora_rank),
                              "alpha": float(alphas.get(layer.name, layer.lora_alpha)),
                              "kernel": how})
    config = _strip_lora(keras.saving.serialize_keras_object(model))
    plain = keras.saving.deserialize_keras_object(config)
    values = {v.path: v for v in model.weights}
    for v in plain.weights:
        if v.path in folded:
            v.assign(folded[v.path])
        else:
            v.assign(values[v.path].numpy())
    if model.optimizer is not None:
        _carry_optimizer(model, plain, report)
    from surgeon.formats import provenance
    from surgeon.train.checkpoint import write_keras
    rec = provenance.command_record("lora merge", {"input": src, "output": output, "like": like},
                                    {"input": src, "like": like}, report.to_json())
    write_keras(plain, output, provenance.chained(src, rec) if str(src).endswith(".keras") else [rec])
    return report


def _carry_optimizer(model, plain, report):
    """The plain model gets the same optimizer; slots by variable path, the factors' dropped,
    the newly trainable kernels' zero."""
    plain.compile_from_config(model.get_compile_config())
    plain.optimizer.build(plain.trainable_variables)
    old = {v.path: v for v in model.optimizer.variables}
    new_paths = {v.path for v in plain.optimizer.variables}
    for v in plain.optimizer.variables:
        if v.path in old and tuple(old[v.path].shape) == tuple(v.shape):
            v.assign(old[v.path].numpy())
        else:
            v.assign(np.zeros(v.shape, v.dtype))
            report.zeroed_slots.append(v.path)
    report.dropped_slots = sorted(p for p in old if p not in new_paths)


# -- extract / load --------------------------------------------------------------------------

def extract_lora(base, tuned, rank, output, model=None) -> dict:
    """Factor ``tuned − base`` per 2-D kernel into a rank-``rank`` adapter at ``output``
    (``.npz``); returns {"layers": [{layer, rank, rel_error}], "full": [names], ...}."""
    from surgeon.formats import open_checkpoint
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SurgeonError(f"--rank must be a positive integer, got {rank!r}")
    output = Path(output)
    if not output.name.endswith(".npz"):
        raise SurgeonError(f"{output}: an adapter is written as .npz")
    atomic.check_output(output, [base, tuned, model])
    arrays, layers, full = {}, [], []
    with open_checkpoint(base, model=model) as b, open_checkpoint(tuned, model=model) as t:
        bw = {e.name: e for e in b.entries() if e.role in ("param", "state")}
        tw = {e.name: e for e in t.entries() if e.role in ("param", "state")}
        for name in sorted(set(bw) ^ set(tw)):
            raise SurgeonError(f"{name} is in only one of {base} and {tuned}; extract needs "
                               "one architecture")
        for name, e in bw.items():
            if tuple(tw[name].shape) != tuple(e.shape):
                raise SurgeonError(f"{name}: shape {tuple(e.shape)} in {base} but "
                                   f"{tuple(tw[name].shape)} in {tuned}")
        for name, e in bw.items():
            x0 = np.asarray(b.read(name))
            x1 = np.asarray(t.read(name))
            leaf = name.rsplit("/", 1)[-1]
            if leaf in FACTORS and x0.ndim == 2 and e.role == "param" \
                    and np.issubdtype(x0.dtype, np.floating):
                a, bb, err, r = _factor(x1.astype(np.float64) - x0.astype(np.float64), rank)
                arrays[f"{e.layer}/{FACTORS[leaf][0]}"] = a.astype(np.float32)
                arrays[f"{e.layer}/{FACTORS[leaf][1]}"] = bb.astype(np.float32)
                layers.append({"layer": e.layer, "weight": leaf, "rank": r, "rel_error": err})
            elif not np.array_equal(x0, x1):
                arrays[f"full/{name}"] = x1
                full.append(name)
    meta = {"format": "surgeon-lora/1", "rank": rank, "base": str(base), "tuned": str(tuned),
            "layers": layers, "full": full}
    _save_npz(output, arrays, meta)
    return meta


def _factor(delta, rank):
    """(A, B, relative Frobenius error, rank used) with A·B the best rank-r approximation."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    r = min(rank, len(s))
    a, b = u[:, :r] * s[:r], vt[:r]
    norm = float(np.linalg.norm(delta))
    err = float(np.linalg.norm(delta - a @ b) / norm) if norm else 0.0
    return a, b, err, r


def _save_npz(output, arrays, meta):
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{META: np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    tmp = atomic.temp_path(output)
    try:
        tmp.write_bytes(buf.getvalue())
        atomic.commit(tmp, output)
    except BaseException:
        atomic.discard(tmp)
        raise


def read_adapter(path) -> tuple[dict, dict]:
    """(arrays keyed by layer path, metadata) of an adapter written by ``extract_lora``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise SurgeonError(f"{path}: not a LoRA adapter (.npz): {exc}") from None
    if META not in arrays:
        raise SurgeonError(f"{path}: not a surgeon LoRA adapter (no {META})")
    return arrays, json.loads(arrays.pop(META).tobytes().decode())


def _layer_at(model, path):
    layer = model
    for part in path.split("/"):
        try:
            layer = layer.get_layer(part)
        except (ValueError, AttributeError):
            raise SurgeonError(f"adapter layer {path!r} does not exist in model {model.name!r} "
                               f"(no layer {part!r} there)") from None
    return layer


def load_lora(model, adapter):
    """Enable LoRA on the adapter's layers of ``model`` (built from the base) and assign
    the factors; tensors stored whole are assigned by canonical path. Returns the model."""
    arrays, meta = read_adapter(adapter)
    targets = [(entry, _layer_at(model, entry["layer"])) for entry in meta["layers"]]
    variables = {v.path: v for v in model.weights}
    missing = [n for n in meta["full"] if n not in variables]
    if missing:
        raise SurgeonError(f"adapter tensor {missing[0]!r} does not exist in model {model.name!r}")
    for entry, layer in targets:
        a_name, b_name = FACTORS[entry["weight"]]
        a, b = arrays[f"{entry['layer']}/{a_name}"], arrays[f"{entry['layer']}/{b_name}"]
        if not getattr(layer, "lora_enabled", False):
            layer.enable_lora(entry["rank"], lora_alpha=entry["rank"])
        fa, fb = getattr(layer, a_name), getattr(layer, b_name)
        if tuple(fa.shape) != a.shape or tuple(fb.shape) != b.shape:
            raise SurgeonError(f"adapter layer {entry['layer']!r}: factors {a.shape}, {b.shape} "
                               f"do not fit the layer's {tuple(fa.shape)}, {tuple(fb.shape)}")
        fa.assign(a)
        fb.assign(b)
        layer.lora_alpha = entry["rank"]  # scale alpha/rank = 1: A·B is the delta itself
    for name in meta["full"]:
        variables[name].assign(arrays[f"full/{name}"])
    return model
