"""Keras initializers in numpy: same names, same fan computation, same distributions.

Values are drawn from numpy's generator (seeded per tensor), so they follow Keras'
distributions but are not bit-identical to Keras' own random streams.
"""
from __future__ import annotations

import math

import numpy as np

from surgeon.core.errors import RecipeError

# name -> (scale, mode, distribution) for VarianceScaling-based initializers
VARIANCE_SCALING = {
    "glorot_uniform": (1.0, "fan_avg", "uniform"),
    "glorot_normal": (1.0, "fan_avg", "truncated_normal"),
    "he_uniform": (2.0, "fan_in", "uniform"),
    "he_normal": (2.0, "fan_in", "truncated_normal"),
    "lecun_uniform": (1.0, "fan_in", "uniform"),
    "lecun_normal": (1.0, "fan_in", "truncated_normal"),
}
SIMPLE = ("zeros", "ones", "constant", "random_normal", "random_uniform", "truncated_normal",
          "orthogonal", "identity", "variance_scaling")
NAMES = tuple(VARIANCE_SCALING) + SIMPLE
# Keras class names -> snake names
_CLASS = {"GlorotUniform": "glorot_uniform", "GlorotNormal": "glorot_normal",
          "HeUniform": "he_uniform", "HeNormal": "he_normal", "LecunUniform": "lecun_uniform",
          "LecunNormal": "lecun_normal", "Zeros": "zeros", "Ones": "ones", "Constant": "constant",
          "RandomNormal": "random_normal", "RandomUniform": "random_uniform",
          "TruncatedNormal": "truncated_normal", "Orthogonal": "orthogonal",
          "OrthogonalInitializer": "orthogonal", "Identity": "identity",
          "IdentityInitializer": "identity", "VarianceScaling": "variance_scaling"}
# weight name -> (config key holding its initializer, fallback initializer)
CONFIG_KEYS = {"kernel": ("kernel_initializer", "glorot_uniform"),
               "bias": ("bias_initializer", "zeros"),
               "recurrent_kernel": ("recurrent_initializer", "orthogonal"),
               "embeddings": ("embeddings_initializer", "random_uniform"),
               "gamma": ("gamma_initializer", "ones"), "beta": ("beta_initializer", "zeros"),
               "moving_mean": ("moving_mean_initializer", "zeros"),
               "moving_variance": ("moving_variance_initializer", "ones"),
               "depthwise_kernel": ("depthwise_initializer", "glorot_uniform"),
               "pointwise_kernel": ("pointwise_initializer", "glorot_uniform"),
               "alpha": ("alpha_initializer", "zeros"), "scale": ("scale_initializer", "ones")}


def compute_fans(shape):
    """Keras' ``compute_fans``: (fan_in, fan_out) for a kernel shape."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def normalize(spec) -> tuple[str, dict]:
    """(snake name, config) from ``'he_normal'``, ``{'class_name': ..., 'config': ...}``
    or ``{'name': ..., **config}``."""
    if isinstance(spec, str):
        name, cfg = _CLASS.get(spec, spec), {}
    elif isinstance(spec, dict):
        raw = spec.get("class_name", spec.get("name"))
        name = _CLASS.get(raw, raw)
        cfg = dict(spec.get("config") or {k: v for k, v in spec.items() if k not in ("name", "class_name")})
        cfg.pop("seed", None)
    else:
        raise RecipeError(f"initializer must be a name or a table, got {spec!r}")
    if name not in NAMES:
        raise RecipeError(f"unknown initializer {name!r}; known: {', '.join(NAMES)}")
    return name, cfg


def _variance_scaling(shape, rng, scale, mode, distribution):
    fan_in, fan_out = compute_fans(shape)
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[mode]
    scale = scale / max(1.0, fan)
    if distribution == "truncated_normal":
        return _truncated(shape, rng, 0.0, math.sqrt(scale) / 0.87962566103423978)
    if distribution == "untruncated_normal":
        return rng.normal(0.0, math.sqrt(scale), shape)
    limit = math.sqrt(3.0 * scale)
    return rng.uniform(-limit, limit, shape)


def _truncated(shape, rng, mean, stddev):
    """Normal values re-drawn until within two standard deviations (as Keras/TF do)."""
    out = rng.normal(0.0, 1.0, shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.normal(0.0, 1.0, int(bad.sum()))
        bad = np.abs(out) > 2.0
    return mean + stddev * out


def _orthogonal(shape, rng, gain):
    if len(shape) < 2:
        raise RecipeError(f"orthogonal initializer needs a tensor of rank >= 2, got shape {shape}")
    rows = math.prod(shape[:-1])
    cols = shape[-1]
    flat = rng.normal(0.0, 1.0, (max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(flat)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return gain * q.reshape(shape)


def sample(spec, shape, rng) -> np.ndarray:
    """Draw a tensor of ``shape`` (float64) from the initializer ``spec``."""
    name, cfg = normalize(spec)
    shape = tuple(int(d) for d in shape)
    if name in VARIANCE_SCALING:
        return _variance_scaling(shape, rng, *VARIANCE_SCALING[name])
    if name == "variance_scaling":
        return _variance_scaling(shape, rng, float(cfg.get("scale", 1.0)), cfg.get("mode", "fan_in"),
                                 cfg.get("distribution", "truncated_normal"))
    if name == "zeros":
        return np.zeros(shape)
    if name == "ones":
        return np.ones(shape)
    if name == "constant":
        return np.full(shape, float(cfg.get("value", 0.0)))
    if name == "random_normal":
        return rng.normal(float(cfg.get("mean", 0.0)), float(cfg.get("stddev", 0.05)), shape)
    if name == "random_uniform":
        return rng.uniform(float(cfg.get("minval", -0.05)), float(cfg.get("maxval", 0.05)), shape)
    if name == "truncated_normal":
        return _truncated(shape, rng, float(cfg.get("mean", 0.0)), float(cfg.get("stddev", 0.05)))
    if name == "orthogonal":
        return _orthogonal(shape, rng, float(cfg.get("gain", 1.0)))
    if len(shape) != 2:
        raise RecipeError(f"identity initializer needs a 2-D tensor, got shape {shape}")
    return float(cfg.get("gain", 1.0)) * np.eye(*shape)


def find_layer_config(model_json, layer_path: str):
    """The config dict of the layer at canonical path ``a/b`` in a Keras model config, or None."""
    node = model_json
    for part in layer_path.split("/"):
        layers = ((node or {}).get("config") or {}).get("layers") or []
        node = next((l for l in layers if (l.get("config") or {}).get("name") == part), None)
        if node is None:
            return None
    return node.get("config")


def for_weight(model_json, entry):
    """The initializer the model's config declares for ``entry`` (Keras defaults if absent)."""
    wname = entry.name.rsplit("/", 1)[-1]
    key, fallback = CONFIG_KEYS.get(wname, (None, None))
    cfg, parts = None, entry.layer.split("/")
    while model_json and parts and cfg is None:  # an LSTM cell's initializers live on the LSTM
        cfg = find_layer_config(model_json, "/".join(parts))
        parts = parts[:-1]
    if cfg and key and cfg.get(key) is not None:
        found = cfg[key]
        if isinstance(found, str):
            return found
        conf = {k: v for k, v in (found.get("config") or {}).items() if v is not None and k != "seed"}
        name = _CLASS.get(found.get("class_name"), found.get("class_name"))
        return name if not conf else {"class_name": found.get("class_name"), "config": conf}
    if fallback is None:
        raise RecipeError(f"no default initializer known for {entry.name!r}; give initializer=...")
    return fallback
