"""Merge methods: the same tensor of n models (and of their common base) -> one tensor.

Notation: θ₁..θₙ the models' tensors, θ₀ the base's, τᵢ = θᵢ − θ₀ the task vectors, wᵢ
per-model weights, λ (``scale``) a global scaling of the merged task vector.

- ``linear``: Σ wᵢθᵢ / Σ wᵢ (``normalize=True``, default) or Σ wᵢθᵢ. Model soups,
  Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models".
- ``task_arithmetic``: θ₀ + λ Σ wᵢτᵢ. Ilharco et al. 2023, "Editing Models with Task
  Arithmetic" (ICLR).
- ``ties``: trim each τᵢ to its ``density``·size largest magnitudes (ties at the threshold
  kept), elect the sign per element γ = sign(Σ wᵢτ̂ᵢ), disjoint mean over the models
  agreeing with γ: τ = Σ_{i∈A} wᵢτ̂ᵢ / Σ_{i∈A} wᵢ (0 where none agrees); θ₀ + λτ.
  Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS).
- ``dare``: drop each element of τᵢ with probability ``p`` and rescale the kept ones by
  1/(1−p) (seeded per tensor and model: same seed, same result, any order), then combine
  with ``combine="linear"`` (task arithmetic) or ``combine="ties"`` (sign election and
  disjoint mean, no trimming). Yu et al. 2024, "Language Models are Super Mario: Absorbing
  Abilities from Homologous Models as a Free Lunch" (ICML). With p = 0 it is task arithmetic.
- ``slerp`` (two models): sin((1−t)Ω)/sin Ω · θ₁ + sin(tΩ)/sin Ω · θ₂, Ω the angle between
  the flattened tensors; (1−t)θ₁ + tθ₂ when |cos Ω| > 0.9995 or a tensor is zero.
  Shoemake 1985, "Animating rotation with quaternion curves" (SIGGRAPH).
- ``model_stock``: per tensor, c the mean pairwise cosine of the task vectors (clipped to
  [0, 1]; 0 for a zero task vector), t = k·c / (1 + (k−1)·c) for k models;
  t · mean(θᵢ) + (1−t) · θ₀. Jang et al. 2024, "Model Stock: All we need is just a few
  fine-tuned models" (ECCV).

Everything is computed in float64, a chunk of elements at a time (bounded temporaries),
and written into an array of the output dtype.
"""
from __future__ import annotations

import zlib

import numpy as np

from surgeon.core.errors import SurgeonError

CHUNK = 1 << 20  # elements per float64 temporary (8 MB)
SLERP_COLINEAR = 0.9995

# method -> {parameter: default}
METHODS = {
    "linear": {"weight": 1.0, "normalize": True},
    "task_arithmetic": {"weight": 1.0, "scale": 1.0},
    "ties": {"weight": 1.0, "density": 0.2, "scale": 1.0},
    "dare": {"weight": 1.0, "p": 0.5, "scale": 1.0, "combine": "linear", "seed": 0},
    "slerp": {"t": 0.5},
    "model_stock": {},
}
NEEDS_BASE = ("task_arithmetic", "ties", "dare", "model_stock")
PER_MODEL = ("weight", "density", "p")  # one value, or one per model


def method_params(method: str) -> dict:
    """The parameters of ``method`` with their defaults."""
    if method not in METHODS:
        raise SurgeonError(f"unknown merge method {method!r}; methods: {', '.join(METHODS)}")
    return dict(METHODS[method])


def check_params(method, params, n_models, where="merge") -> dict:
    """``params`` validated for ``method`` and ``n_models`` inputs; per-model values
    expanded to lists of length ``n_models``."""
    out = method_params(method)
    unknown = sorted(set(params) - set(out))
    if unknown:
        raise SurgeonError(f"{where}: method {method!r} takes no parameter {unknown[0]!r}; "
                           f"its parameters: {', '.join(out) or 'none'}")
    out.update(params)
    if method in ("slerp",) and n_models != 2:
        raise SurgeonError(f"{where}: slerp merges exactly two models, got {n_models}")
    if method == "model_stock" and n_models < 2:
        raise SurgeonError(f"{where}: model_stock needs at least two fine-tuned models, got {n_models}")
    for key in PER_MODEL:
        if key in out:
            out[key] = _per_model(out[key], n_models, key, where)
    for d in out.get("density", ()):
        _in_range(d, 0.0, 1.0, "density", where)
    for p in out.get("p", ()):
        if not 0.0 <= p < 1.0:
            raise SurgeonError(f"{where}: p (drop probability) must be in [0, 1), got {p!r}")
    if "t" in out:
        _in_range(out["t"], 0.0, 1.0, "t", where)
    if out.get("combine", "linear") not in ("linear", "ties"):
        raise SurgeonError(f"{where}: combine must be 'linear' or 'ties', got {out['combine']!r}")
    if method == "linear" and out["normalize"] and abs(sum(out["weight"])) < 1e-12:
        raise SurgeonError(f"{where}: the weights sum to 0; give other weights or normalize=false")
    for key in ("scale", "t", "seed"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], (int, float))):
            raise SurgeonError(f"{where}: {key} must be a number, got {out[key]!r}")
    return out


def _per_model(value, n, key, where):
    vals = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(vals) != n:
        raise SurgeonError(f"{where}: {key} has {len(vals)} value(s) for {n} model(s); give one "
                           "value, or one per model in the order the models are given")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SurgeonError(f"{where}: {key} must be a number, got {v!r}")
    return [float(v) for v in vals]


def _in_range(v, lo, hi, key, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise SurgeonError(f"{where}: {key} must be in [{lo}, {hi}], got {v!r}")


def merge_tensor(method, models, base, params, key="", out_dtype=None) -> np.ndarray:
    """The merged tensor (shape of the inputs, dtype ``out_dtype`` or the first model's).

    Args:
        method: a key of ``METHODS``.
        models: the n models' values of this tensor (same shape).
        base: the base's value (methods in ``NEEDS_BASE``), else None.
        params: validated parameters (``check_params``).
        key: the tensor's name: seeds DARE's draws (order-independent).
    """
    shape = models[0].shape
    out = np.empty(models[0].size, out_dtype or models[0].dtype)
    flat = [np.ravel(m) for m in models]
    b = None if base is None else np.ravel(base)
    fn = {"linear": _linear, "task_arithmetic": _task, "ties": _ties, "dare": _dare,
          "slerp": _slerp, "model_stock": _model_stock}[method]
    fn(flat, b, params, key, out)
    return out.reshape(shape)


def _chunks(size):
    for start in range(0, size, CHUNK):
        yield slice(start, min(size, start + CHUNK))


def _f64(a, sl):
    return np.asarray(a[sl], dtype=np.float64)


def _linear(models, _base, p, _key, out):
    w = p["weight"]
    total = sum(w) if p["normalize"] else 1.0
    for sl in _chunks(out.size):
        acc = np.zeros(sl.stop - sl.start)
        for wi, m in zip(w, models):
            acc += wi * _f64(m, sl)
        out[sl] = acc / total


def _task(models, base, p, key, out):
    _combine(models, base, dict(p, p=[0.0] * len(models), combine="linear"), key, out)


def _dare(models, base, p, key, out):
    _combine(models, base, p, key, out)


def _rng(seed, key, i):
    return np.random.default_rng([int(seed), zlib.crc32(key.encode()), i])


def _combine(models, base, p, key, out):
    """θ₀ + λ · combine(wᵢ · drop(τᵢ)) -- task arithmetic and DARE (linear or TIES)."""
    w, drop, lam = p["weight"], p["p"], p["scale"]
    rngs = [_rng(p.get("seed", 0), key, i) if q > 0 else None for i, q in enumerate(drop)]
    for sl in _chunks(out.size):
        b = _f64(base, sl)
        taus = []
        for wi, q, rng, m in zip(w, drop, rngs, models):
            tau = _f64(m, sl) - b
            if rng is not None:
                keep = rng.random(tau.size) >= q
                tau = np.where(keep, tau / (1.0 - q), 0.0)
            taus.append(wi * tau)
        if p["combine"] == "ties":
            merged = _disjoint_mean(taus, w)
        else:
            merged = taus[0].copy()
            for t in taus[1:]:
                merged += t
        out[sl] = b + lam * merged


def _disjoint_mean(wtaus, w):
    """Sign election (γ = sign Σ wᵢτᵢ) and the weighted mean over the agreeing models."""
    total = np.zeros_like(wtaus[0])
    for t in wtaus:
        total += t
    sign = np.sign(total)
    num, den = np.zeros_like(total), np.zeros_like(total)
    for wi, t in zip(w, wtaus):
        agree = (np.sign(t) == sign) & (t != 0)
        num += np.where(agree, t, 0.0)
        den += np.where(agree, wi, 0.0)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def _ties(models, base, p, key, out):
    w, lam = p["weight"], p["scale"]
    thresholds = [_trim_threshold(m, base, d) for m, d in zip(models, p["density"])]
    work = np.result_type(np.float32, base.dtype)
    for sl in _chunks(out.size):
        b = _f64(base, sl)
        bw = np.asarray(base[sl], dtype=work)
        taus = []
        for wi, thr, m in zip(w, thresholds, models):
            keep = np.abs(np.asarray(m[sl], dtype=work) - bw) >= thr
            taus.append(np.where(keep, wi * (_f64(m, sl) - b), 0.0))
        out[sl] = b + lam * _disjoint_mean(taus, w)


def _trim_threshold(m, base, density):
    """The magnitude of the k-th largest |τ| (k = round(density·size)); +inf keeps none."""
    size = m.size
    k = int(round(density * size))
    if k <= 0:
        return np.inf
    work = np.result_type(np.float32, base.dtype)
    mag = np.subtract(np.asarray(m, dtype=work), np.asarray(base, dtype=work))
    np.abs(mag, out=mag)
    mag.partition(size - k)  # in place: one temporary the size of the tensor
    return mag[size - k]


def _dots(a, b, base=None):
    """(a·b, |a|², |b|²) of the flattened (a − base), (b − base), in float64 chunks."""
    dot = na = nb = 0.0
    for sl in _chunks(a.size):
        x, y = _f64(a, sl), _f64(b, sl)
        if base is not None:
            z = _f64(base, sl)
            x, y = x - z, y - z
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    return dot, na, nb


def slerp_coefficients(dot, n0, n1, t):
    """(s0, s1) with result s0·v0 + s1·v1; linear when nearly colinear or a norm is 0."""
    if n0 == 0.0 or n1 == 0.0:
        return 1.0 - t, t
    cos = dot / np.sqrt(n0 * n1)
    if abs(cos) > SLERP_COLINEAR:
        return 1.0 - t, t
    omega = float(np.arccos(np.clip(cos, -1.0, 1.0)))
    s = np.sin(omega)
    return float(np.sin((1.0 - t) * omega) / s), float(np.sin(t * omega) / s)


def _slerp(models, _base, p, _key, out):
    v0, v1 = models
    s0, s1 = slerp_coefficients(*_dots(v0, v1), p["t"])
    for sl in _chunks(out.size):
        out[sl] = s0 * _f64(v0, sl) + s1 * _f64(v1, sl)


def model_stock_ratio(models, base) -> float:
    """t = k·c / (1 + (k−1)·c), c the mean pairwise cosine of the task vectors in [0, 1]."""
    k, cos = len(models), []
    for i in range(k):
        for j in range(i + 1, k):
            dot, ni, nj = _dots(models[i], models[j], base)
            c = 0.0 if ni == 0.0 or nj == 0.0 else dot / np.sqrt(ni * nj)
            cos.append(min(1.0, max(0.0, c)))
    c = float(np.mean(cos))
    return k * c / (1.0 + (k - 1) * c)


def _model_stock(models, base, _p, _key, out):
    t = model_stock_ratio(models, base)
    k = len(models)
    for sl in _chunks(out.size):
        mean = _f64(models[0], sl)
        for m in models[1:]:
            mean += _f64(m, sl)
        out[sl] = t * (mean / k) + (1.0 - t) * _f64(base, sl)
