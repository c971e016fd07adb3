"""Health checks of one checkpoint: values, optimizer-state consistency, dtypes.

Every tensor is read once, in chunks (a param together with its slots, so masked
weights can be checked against their moments). The library never prints; see
``surgeon.inspect.report.audit_text``. Finding codes and severities are listed in ``CODES``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from surgeon.inspect.stream import CHUNK_BYTES, as_float, fdot, iter_chunks, zip_flat
from surgeon.binding.layers import variable_dtype, variable_dtypes
from surgeon.ops.base import slot_power

SEVERITIES = ("error", "warning", "info")
CODES = {
    "nan": ("error", "tensor holds NaN values"),
    "inf": ("error", "tensor holds infinite values"),
    "all-zero": ("warning", "a kernel (2+ dims) is entirely zero"),
    "constant": ("warning", "a kernel (2+ dims) holds one repeated non-zero value"),
    "dead-unit": ("warning", "some output units/filters of a kernel are all zero"),
    "exploding-norm": ("warning", "kernel RMS x sqrt(fan-in) far above the initialisation scale (~1)"),
    "slot-missing": ("error", "a trainable param has no (or fewer) optimizer slots than the others"),
    "slot-on-frozen": ("error", "a frozen param has optimizer slots (Keras then skips the whole optimizer)"),
    "slot-shape": ("error", "an optimizer slot's shape differs from its param's"),
    "slot-dtype": ("warning", "an optimizer slot's dtype is neither its param's stored dtype nor the "
                              "variable dtype Keras creates its slots with"),
    "optimizer-mismatch": ("error", "the optimizer's variables do not fit the model"),
    "unresolved-slots": ("warning", "optimizer slots could not be bound to params (pass --model)"),
    "masked-moments": ("warning", "zero (masked/pruned) weights with non-zero optimizer moments"),
    "masked-nonzero": ("warning", "weights masked by a stored pruning mask are not zero"),
    "moments-reset": ("warning", "second-moment slots all zero while the iteration counter is large"),
    "mixed-dtypes": ("warning", "weights are stored in more than one floating dtype"),
    "no-optimizer": ("info", "no optimizer state stored"),
    "empty-vocabulary": ("error", "a lookup layer's vocabulary asset holds no token (Keras refuses it)"),
}


@dataclass(frozen=True)
class Finding:
    """One health finding: ``severity`` (error/warning/info), ``code`` (see CODES),
    ``tensor`` (canonical name or None), ``message``."""

    severity: str
    code: str
    tensor: str | None
    message: str

    def to_json(self):
        return {"severity": self.severity, "code": self.code, "tensor": self.tensor, "message": self.message}


@dataclass
class AuditResult:
    path: str
    format: str
    checked: int = 0
    findings: list = field(default_factory=list)
    iteration_threshold: int | None = None
    norm_threshold: float = 100.0
    reset_ratio: float | None = None  # first step after zeroed second moments / a settled one

    def add(self, code, tensor, message):
        self.findings.append(Finding(CODES[code][0], code, tensor, message))

    def counts(self):
        c = {s: 0 for s in SEVERITIES}
        for f in self.findings:
            c[f.severity] += 1
        return c

    @property
    def ok(self):
        return not any(f.severity == "error" for f in self.findings)

    def sorted(self):
        return sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity))

    def to_json(self):
        return {"path": self.path, "format": self.format, "ok": self.ok, "checked": self.checked,
                "counts": self.counts(), "findings": [f.to_json() for f in self.sorted()]}


class _Stats:
    """Streaming value statistics of one tensor (flat pieces in C order)."""

    def __init__(self, entry, units=False):
        self.n = self.nan = self.inf = self.zeros = self.offset = 0
        self.lo, self.hi, self.sumsq = math.inf, -math.inf, 0.0
        self.last = int(entry.shape[-1]) if units and len(entry.shape) >= 2 else 0
        self.unit_nz = np.zeros(self.last, bool) if self.last else None

    def update(self, x):
        x64 = as_float(x)
        fin = np.isfinite(x64)
        xf = x64
        if not fin.all():
            self.nan += int(np.count_nonzero(np.isnan(x64)))
            self.inf += int(np.count_nonzero(np.isinf(x64)))
            xf = x64[fin]
        nz = x64 != 0
        self.zeros += int(x64.size - np.count_nonzero(nz))
        if xf.size:
            self.lo, self.hi = min(self.lo, float(xf.min())), max(self.hi, float(xf.max()))
            self.sumsq += fdot(xf, xf)
        if self.last:
            if self.offset % self.last == 0 and nz.size % self.last == 0:
                self.unit_nz |= nz.reshape(-1, self.last).any(axis=0)
            else:
                self.unit_nz[(self.offset + np.flatnonzero(nz)) % self.last] = True
        self.offset += x64.size
        self.n += x64.size
        return nz


def _values(result, e, st):
    """Findings from one tensor's value statistics."""
    if st.nan:
        result.add("nan", e.name, f"{st.nan} NaN value(s) of {st.n}")
    if st.inf:
        result.add("inf", e.name, f"{st.inf} infinite value(s) of {st.n}")
    if e.role not in ("param", "state") or len(e.shape) < 2 or st.n < 2 or st.nan or st.inf:
        return
    if st.zeros == st.n:
        result.add("all-zero", e.name, f"all {st.n} values are zero")
        return
    if st.lo == st.hi:
        result.add("constant", e.name, f"all {st.n} values equal {st.lo:.6g}")
        return
    dead = int(np.count_nonzero(~st.unit_nz)) if st.last > 1 else 0
    if dead:
        idx = ", ".join(str(i) for i in np.flatnonzero(~st.unit_nz)[:8]) + (", ..." if dead > 8 else "")
        result.add("dead-unit", e.name, f"{dead} of {st.last} output units are all zero (index {idx})")
    fan_in = st.n // int(e.shape[-1])
    scale = math.sqrt(st.sumsq / st.n) * math.sqrt(fan_in)
    if scale > result.norm_threshold:
        result.add("exploding-norm", e.name, f"RMS x sqrt(fan-in {fan_in}) = {scale:.3g} "
                                             f"(initialisation gives ~1; threshold {result.norm_threshold:g})")


def _check_param(reader, result, p, slots, chunk_bytes, iteration, mask=None):
    """Stream a param with its same-shaped slots; value, mask and reset checks.

    ``mask`` (bool, True = kept) is the pruning mask stored by ``surgeon.ops.mask``;
    without one, exact zeros in the param count as masked."""
    same = [s for s in slots if tuple(s.shape) == tuple(p.shape)]
    pst = _Stats(p, units=True)
    sst = [_Stats(s) for s in same]
    flat_mask = mask.reshape(-1) if mask is not None and mask.shape == tuple(p.shape) else None
    masked = moving_masked = revived = 0
    streams = [iter_chunks(reader, p.name, chunk_bytes)] + [iter_chunks(reader, s.name, chunk_bytes) for s in same]
    for pieces in zip_flat(*streams):
        off = pst.offset
        pnz = pst.update(pieces[0])
        moving = np.zeros(pnz.shape, bool)
        for st, piece in zip(sst, pieces[1:]):
            moving |= st.update(piece)
        cut = ~flat_mask[off:off + pnz.size] if flat_mask is not None else ~pnz
        masked += int(np.count_nonzero(cut))
        moving_masked += int(np.count_nonzero(cut & moving))
        revived += int(np.count_nonzero(cut & pnz)) if flat_mask is not None else 0
    _values(result, p, pst)
    for s, st in zip(same, sst):
        _values(result, s, st)
    what = "masked (stored pruning mask)" if flat_mask is not None else "zero (masked)"
    if revived:
        result.add("masked-nonzero", p.name, f"{revived} of {masked} weights masked by the stored "
                   "pruning mask are not zero")
    if moving_masked:
        result.add("masked-moments", p.name,
                   f"{moving_masked} of {masked} {what} weights have non-zero optimizer "
                   f"moments ({', '.join(s.slot for s in same)}); the next step moves them off zero")
    # Only zero second moments make the next steps too large (Adam's bias correction is
    # ~1 at a large iteration, RMSprop/Adagrad have none); zero first moments just restart
    # the momentum -- what slots="warm" does on purpose.
    reset = [s.slot for s, st in zip(same, sst)
             if st.n and st.zeros == st.n and slot_power(s.slot) == 2]
    if reset and iteration is not None and _reset_matters(result, iteration):
        ratio = result.reset_ratio
        size = f"~{ratio:.1f}x" if ratio is not None else "several times"
        result.add("moments-reset", p.name,
                   f"second moments ({', '.join(reset)}) are all zero while iteration={iteration}: "
                   f"bias correction no longer compensates, so the first updates are {size} a "
                   "normal step (warm-reset the slots or restart the iteration count)")
    return 1 + len(same)


def _reset_matters(result, iteration) -> bool:
    """Zeroed second moments are reported by the same rule as apply's plan warning.

    With an explicit ``iteration_threshold`` that threshold decides; otherwise the first
    update's size (``reset_step_ratio``: Adam-like optimizers, from their betas and the
    iteration) must reach ``RESET_RATIO_LIMIT``; optimizers without such a model fall back
    to iteration 100.
    """
    from surgeon.binding.optimizers import RESET_RATIO_LIMIT
    if result.iteration_threshold is not None:
        return iteration >= result.iteration_threshold
    if result.reset_ratio is not None:
        return result.reset_ratio >= RESET_RATIO_LIMIT
    return iteration >= 100


def _masks(reader):
    """Pruning masks stored by the recipe engine ({} when none or unsupported)."""
    try:
        from surgeon.ops.mask import read_masks
    except ImportError:
        return {}
    if not hasattr(reader, "read_key"):
        return {}
    return read_masks(reader)


def _check_alone(reader, result, e, chunk_bytes):
    st = _Stats(e, units=e.role in ("param", "state"))
    for (piece,) in zip_flat(iter_chunks(reader, e.name, chunk_bytes)):
        st.update(piece)
    _values(result, e, st)


def audit_checkpoint(reader, *, chunk_bytes=CHUNK_BYTES, iteration_threshold=None,
                     norm_threshold=100.0, model_json=None) -> AuditResult:
    """Run every check on an open reader.

    Args:
        reader: from ``open_checkpoint``.
        chunk_bytes: bytes read per chunk (bounds peak memory).
        iteration_threshold: iteration from which all-zero second moments are reported
            (default: when the first update after them is >= 2x a settled one, the rule
            ``apply`` warns by; see ``_reset_matters``).
        norm_threshold: ``RMS * sqrt(fan_in)`` above which a kernel's norm is "exploding".
        model_json: the model config (for a bare weights file; a ``.keras`` has its own).
    Returns:
        An :class:`AuditResult` (``ok`` is False when any finding is an error).
    Example:
        >>> with open_checkpoint("fixtures/cnn_adam.keras") as ck:
        ...     audit_checkpoint(ck).findings
        []
    """
    md = reader.metadata()
    result = AuditResult(str(md.get("path")), md.get("format"))
    result.iteration_threshold, result.norm_threshold = iteration_threshold, norm_threshold
    entries = reader.entries()
    iteration = (md.get("optimizer") or {}).get("iterations")
    from surgeon.binding.optimizers import reset_step_ratio
    result.reset_ratio = reset_step_ratio((md.get("optimizer") or {}).get("class_name"),
                                          getattr(getattr(reader, "optimizer", None), "config", None),
                                          iteration)
    slots = {}
    for e in entries:
        if e.role == "slot" and e.slot_of:
            slots.setdefault(e.slot_of, []).append(e)
    done, masks = set(), _masks(reader)
    for e in entries:
        if e.role == "param":
            result.checked += _check_param(reader, result, e, slots.get(e.name, []), chunk_bytes, iteration,
                                           masks.get(e.name))
            done.update([e.name] + [s.name for s in slots.get(e.name, []) if tuple(s.shape) == tuple(e.shape)])
    for e in entries:
        if e.name not in done:
            _check_alone(reader, result, e, chunk_bytes)
            result.checked += 1
    _check_structure(reader, result, entries, md, model_json or _model_json(reader))
    _mixed_dtypes(result, entries)
    from surgeon.formats.assets import empty_vocabularies
    for member in empty_vocabularies(reader):
        result.add("empty-vocabulary", None, f"{member}: vocabulary holds only OOV/mask tokens")
    return result


# -- optimizer structure ---------------------------------------------------------------------
def _model_json(reader):
    return getattr(reader, "config", None) or getattr(reader, "model_config", None)


def _check_structure(reader, result, entries, md, model_json=None):
    """Slots vs params: bound slots checked directly; unresolved ones diagnosed. A slot
    is healthy in its param's stored dtype or in the dtype of the param's Keras variable
    (Keras' ``add_variable_from_reference`` gives slots the variable's dtype: float32
    under ``mixed_bfloat16``, also when surgeon's ``cast`` stores the weight as bfloat16)."""
    by_name = {e.name: e for e in entries}
    dtypes = variable_dtypes(model_json)
    bound = [e for e in entries if e.role == "slot" and e.slot_of]
    unresolved = [e for e in entries if e.role == "slot" and not e.slot_of]
    if not md.get("optimizer") and not bound and not unresolved:
        result.add("no-optimizer", None, "no optimizer state stored: training resumes with fresh moments")
        return
    for s in bound:
        p = by_name.get(s.slot_of)
        if p is None:
            continue
        if tuple(s.shape) != _slot_shape(reader, s.slot, p.shape):
            result.add("slot-shape", s.name, f"shape {tuple(s.shape)} differs from {p.name} {tuple(p.shape)}")
        var_dtype = variable_dtype(dtypes, p.name)
        if s.dtype not in (p.dtype, var_dtype) and tuple(s.shape) == tuple(p.shape):  # (not a placeholder)
            also = (f" and from the {var_dtype} Keras gives its variable"
                    if var_dtype not in (None, p.dtype) else "")
            result.add("slot-dtype", s.name, f"dtype {s.dtype} differs from {p.name} {p.dtype}{also}")
        if p.frozen:
            result.add("slot-on-frozen", p.name, f"frozen param has optimizer slot {s.slot}; "
                                                 "Keras skips loading the whole optimizer")
    if unresolved:
        _diagnose(reader, result, entries, unresolved)
    elif bound:
        kinds = sorted({s.slot for s in bound})
        have = {}
        for s in bound:
            have.setdefault(s.slot_of, set()).add(s.slot)
        for p in entries:
            if p.role == "param" and not p.frozen and set(kinds) - have.get(p.name, set()):
                missing = ", ".join(k for k in kinds if k not in have.get(p.name, set()))
                result.add("slot-missing", p.name, f"trainable param has no optimizer slot {missing}")


def _slot_shape(reader, slot, shape):
    """The shape a slot should have (a param's, or Adafactor's factored r/c)."""
    from surgeon.binding import optimizers
    opt = getattr(reader, "optimizer", None)
    layout = optimizers.layout_for(opt.class_name, opt.config) if opt and opt.class_name else None
    return layout.slot_shape(slot, shape) if layout else tuple(shape)


def _opt_index(e):
    tail = e.key.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _diagnose(reader, result, entries, unresolved):
    """Explain positional slots that did not bind (Keras 3 layouts, model config known)."""
    from surgeon.binding import optimizers
    opt = getattr(reader, "optimizer", None)
    layout = optimizers.layout_for(opt.class_name, opt.config) if opt and opt.config else None
    rest = sorted(unresolved, key=lambda e: (_opt_index(e) is None, _opt_index(e) or 0))
    if layout is None or any(_opt_index(e) is None for e in rest):
        result.add("unresolved-slots", None, f"{len(unresolved)} optimizer slot(s) are not bound to params "
                   "and cannot be checked; pass --model FILE.keras|config.json")
        return
    params = [e for e in entries if e.role == "param"]
    shape = {p.name: tuple(p.shape) for p in params}
    trainable = [p.name for p in params if not p.frozen]
    expected = layout.order(trainable)
    if len(expected) == len(rest):
        for (p, s), v in zip(expected, rest):
            if tuple(v.shape) != shape[p]:
                result.add("slot-shape", f"optimizer/{p}/{s}", f"{v.key} (slot {s} of {p} by position) has "
                           f"shape {tuple(v.shape)}, the param {shape[p]}; Keras skips the whole optimizer")
        return
    frozen_layers = list(dict.fromkeys(p.layer for p in params if p.frozen))
    for chosen in [[ly] for ly in frozen_layers] + ([frozen_layers] if len(frozen_layers) > 1 else []):
        names = [p.name for p in params if not p.frozen or p.layer in chosen]
        order = layout.order(names)
        if len(order) == len(rest) and all(shape[p] == tuple(v.shape) for (p, _), v in zip(order, rest)):
            for p in names:
                if p not in trainable:
                    result.add("slot-on-frozen", p, "frozen param has optimizer slots "
                               f"({', '.join(layout.slots)}); Keras skips loading the whole optimizer")
            return
    if len(rest) < len(expected):
        _align_missing(result, expected, rest, shape)
        return
    result.add("optimizer-mismatch", None, f"{len(rest)} optimizer slot variables, the model needs "
               f"{len(expected)} ({len(layout.slots)} per trainable param x {len(trainable)}); "
               "Keras skips loading the whole optimizer")


def _align_missing(result, expected, rest, shape):
    """Greedy shape alignment: the expected (param, slot) pairs with no stored variable."""
    missing, i = {}, 0
    for p, s in expected:
        if i < len(rest) and tuple(rest[i].shape) == shape[p]:
            i += 1
        else:
            missing.setdefault(p, []).append(s)
    for p, ss in missing.items():
        result.add("slot-missing", p, f"trainable param has no optimizer slot {', '.join(ss)} "
                   f"({len(rest)} slot variables stored, {len(expected)} expected); "
                   "Keras skips loading the whole optimizer")


def _mixed_dtypes(result, entries):
    counts = {}
    for e in entries:
        if e.role in ("param", "state") and (e.dtype.startswith("float") or e.dtype == "bfloat16"):
            counts[e.dtype] = counts.get(e.dtype, 0) + 1
    if len(counts) > 1:
        parts = ", ".join(f"{n} {d}" for d, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        result.add("mixed-dtypes", None, f"weights use several dtypes: {parts}")


def audit_path(path, model=None, **kw) -> AuditResult:
    """Open ``path`` (``model`` for bare weights files) and audit it."""
    from .diff import model_for
    from surgeon.formats import open_checkpoint
    from surgeon.formats.keras_h5 import read_model_json
    model = model_for(path, model)
    with open_checkpoint(path, model=model) as reader:
        return audit_checkpoint(reader, model_json=read_model_json(model) if model else None, **kw)
