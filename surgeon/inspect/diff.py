"""Compare two checkpoints tensor by tensor, streaming (one pair at a time, in chunks).

The library never prints; ``surgeon.inspect.report`` renders a :class:`DiffResult` as text,
markdown, JSON or a PNG. Statistics are accumulated in float64 over chunks read along
axis 0, so peak memory is bounded by the chunk size, not by the checkpoint.
"""
from __future__ import annotations

import fnmatch
import math
import re

import numpy as np

from surgeon.core.errors import SurgeonError
from surgeon.inspect.result import DiffResult, TensorDiff
from surgeon.inspect.stream import CHUNK_BYTES, as_float, fdot, iter_chunks, numeric, zip_flat

SAMPLE_PER_TENSOR = 4096


# -- comparison ------------------------------------------------------------------------
class _Acc:
    """Float64 accumulators for one pair of equally shaped tensors."""

    def __init__(self, atol, rtol, sample):
        self.atol, self.rtol, self.sample = atol, rtol, sample
        self.n_changed, self.max_abs = 0, 0.0
        self.sq_d = self.sq_a = self.sq_b = self.dot = 0.0
        self.samples = []

    def update(self, a, b):
        a, b = numeric(a), numeric(b)
        if a.dtype == b.dtype and np.array_equal(a, b):
            s = fdot(a, a)
            self.sq_a += s
            self.sq_b += s
            self.dot += s
            return
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.subtract(b, a, dtype=np.float64)
            sq_d = fdot(d, d)
            if math.isfinite(sq_d):  # common case: no NaN/Inf, fewer passes
                bad = (a != b) if self.atol == 0 and self.rtol == 0 else \
                    np.abs(d) > self.atol + self.rtol * np.abs(as_float(a))
                self.max_abs = max(self.max_abs, float(d.max()), -float(d.min())) if d.size else self.max_abs
            else:
                bad, sq_d = self._special(as_float(a), as_float(b), d)
            self.n_changed += int(np.count_nonzero(bad))
            self.sq_d += sq_d
            self.sq_a += fdot(a, a)
            self.sq_b += fdot(b, b)
            self.dot += fdot(a, b)
        if self.sample and self.n_changed:
            picked = d[bad]
            stride = max(1, picked.size // self.sample)
            self.samples.append(picked[::stride][: self.sample])

    def _special(self, a64, b64, d):
        """Changed-element mask and squared difference when NaN/Inf are present: NaN
        against NaN and equal infinities count as equal; max_abs ignores NaN."""
        ad = np.abs(d)
        bad = ~(ad <= self.atol + self.rtol * np.abs(a64)) & (a64 != b64)
        nan = np.isnan(d)
        if nan.any():
            bad &= ~(np.isnan(a64) & np.isnan(b64))
            ad = np.where(nan, 0.0, ad)
        self.max_abs = max(self.max_abs, float(ad.max()) if ad.size else 0.0)
        return bad, fdot(d, d)


def _sq_norm(reader, name, chunk_bytes):
    total = 0.0
    for c in iter_chunks(reader, name, chunk_bytes):
        c = numeric(np.asarray(c).reshape(-1))
        with np.errstate(over="ignore", invalid="ignore"):
            total += fdot(c, c)
    return total


def compare_pair(ra, ea, rb, eb, name, atol=0.0, rtol=0.0, chunk_bytes=CHUNK_BYTES, sample=0):
    """Compare entry ``ea`` of reader ``ra`` with ``eb`` of ``rb`` (streamed)."""
    t = TensorDiff(name, "equal", eb.role, eb.layer or _layer_of(name, eb.role), eb.slot_of, eb.slot,
                   tuple(ea.shape), tuple(eb.shape), ea.dtype, eb.dtype, size=eb.size)
    if tuple(ea.shape) != tuple(eb.shape):
        t.status = "reshaped"
        t.norm_a = math.sqrt(_sq_norm(ra, ea.name, chunk_bytes))
        t.norm_b = math.sqrt(_sq_norm(rb, eb.name, chunk_bytes))
        return t
    acc = _Acc(atol, rtol, sample)
    for a, b in zip_flat(iter_chunks(ra, ea.name, chunk_bytes), iter_chunks(rb, eb.name, chunk_bytes)):
        acc.update(a, b)
    t.n_changed, t.max_abs = acc.n_changed, acc.max_abs
    t.l2_diff, t.norm_a, t.norm_b = math.sqrt(acc.sq_d), math.sqrt(acc.sq_a), math.sqrt(acc.sq_b)
    t.dot = acc.dot
    if acc.samples:
        t.sample = np.concatenate(acc.samples)
    if ea.dtype != eb.dtype:
        t.status = "retyped"
    elif acc.n_changed:
        t.status = "changed"
    return t


def _layer_of(name, role):
    if role == "optimizer" or name.startswith("optimizer/unresolved/"):
        return "optimizer"
    return name.rsplit("/", 1)[0] if "/" in name else ""


def parse_map(spec: str):
    """``'regex=replacement'`` -> (compiled regex, replacement)."""
    pattern, sep, repl = spec.partition("=")
    if not sep or not pattern:
        raise SurgeonError(f"--map {spec!r}: expected 'regex=replacement' (e.g. '^dense_1/=fc/')")
    try:
        return re.compile(pattern), repl
    except re.error as exc:
        raise SurgeonError(f"--map {spec!r}: bad regular expression: {exc}") from None


def _renamer(maps):
    compiled = [parse_map(m) if isinstance(m, str) else m for m in maps]

    def rename(name):
        if name is None:
            return None
        for rx, repl in compiled:
            name = rx.sub(repl, name)
        return name
    return rename


def _keep(entry, name, slot_of, only, ignore_optimizer):
    if ignore_optimizer and entry.role in ("slot", "optimizer"):
        return False
    if only is None:
        return True
    return fnmatch.fnmatchcase(name, only) or (slot_of is not None and fnmatch.fnmatchcase(slot_of, only))


def _side(reader):
    md = reader.metadata()
    return {"path": md.get("path"), "format": md.get("format"), "optimizer": md.get("optimizer")}


def diff_checkpoints(ra, rb, *, atol=0.0, rtol=0.0, only=None, ignore_optimizer=False, maps=(),
                     chunk_bytes=CHUNK_BYTES, sample=0) -> DiffResult:
    """Compare two open readers tensor by tensor.

    Args:
        ra, rb: readers from ``open_checkpoint`` (any formats).
        atol, rtol: an element differs when ``|b - a| > atol + rtol * |a|``.
        only: glob on canonical names (slots follow their param).
        ignore_optimizer: skip optimizer slots and globals.
        maps: ``'regex=replacement'`` strings applied, in order, to A's names.
        chunk_bytes: bytes read per chunk (bounds peak memory).
        sample: keep up to this many changed deltas per tensor (for histograms).
    Returns:
        A :class:`DiffResult`.
    Example:
        >>> with open_checkpoint("a.keras") as a, open_checkpoint("b.keras") as b:
        ...     diff_checkpoints(a, b).equal
    """
    if atol < 0 or rtol < 0:
        raise SurgeonError(f"tolerances must be >= 0, got atol={atol}, rtol={rtol}")
    rename = _renamer(maps)
    a_entries, b_entries = _metrics_on_both(ra.entries(), rb.entries())
    a_map = {}
    for e in a_entries:
        new = rename(e.name)
        if _keep(e, new, rename(e.slot_of), only, ignore_optimizer):
            if new in a_map:
                raise SurgeonError(f"--map sends {a_map[new].name!r} and {e.name!r} to the same name {new!r}")
            a_map[new] = e
    b_map = {e.name: e for e in b_entries if _keep(e, e.name, e.slot_of, only, ignore_optimizer)}
    result = DiffResult(_side(ra), _side(rb), atol, rtol)
    for name, ea in a_map.items():
        eb = b_map.get(name)
        if eb is None:
            result.tensors.append(TensorDiff(name, "removed", ea.role, _mapped_layer(ea, name),
                                             rename(ea.slot_of), ea.slot, shape_a=tuple(ea.shape),
                                             dtype_a=ea.dtype, size=ea.size))
        else:
            result.tensors.append(compare_pair(ra, ea, rb, eb, name, atol, rtol, chunk_bytes, sample))
    for name, eb in b_map.items():
        if name not in a_map:
            result.tensors.append(TensorDiff(name, "added", eb.role, eb.layer or _layer_of(name, eb.role),
                                             eb.slot_of, eb.slot, shape_b=tuple(eb.shape),
                                             dtype_b=eb.dtype, size=eb.size))
    _flag_slots(result.tensors)
    if any(t.status in ("added", "removed") for t in result.tensors):
        result.notes = [f"{side}: {n}" for side, r in (("A", ra), ("B", rb))
                        for n in (r.metadata().get("notes") or [])]
    from surgeon.formats.assets import differ
    result.assets = differ(ra, rb)
    return result


def _metrics_on_both(a, b):
    """Metric variables are compared only when both sides hold some (a ``.keras`` file
    keeps none: an Orbax checkpoint of the same state is equal to it)."""
    from surgeon.core.tree import is_metric
    if any(map(is_metric, a)) and any(map(is_metric, b)):
        return a, b
    return [e for e in a if not is_metric(e)], [e for e in b if not is_metric(e)]


def _mapped_layer(entry, name):
    if entry.role == "slot" and entry.slot_of:
        return _layer_of(entry.slot_of, "param")
    return _layer_of(name, entry.role)


def _flag_slots(tensors):
    """Flag a param that changed while its slots did not, or the reverse."""
    by_param = {}
    for t in tensors:
        if t.role == "slot" and t.slot_of and t.status not in ("added", "removed"):
            by_param.setdefault(t.slot_of, []).append(t)
    for t in tensors:
        slots = by_param.get(t.name)
        if t.role != "param" or not slots or t.status in ("added", "removed"):
            continue
        changed = [s.slot for s in slots if s.status != "equal"]
        names = ", ".join(s.slot for s in slots)
        if t.status != "equal" and not changed:
            t.flag = f"param changed but its optimizer slots ({names}) did not"
        elif t.status == "equal" and changed:
            t.flag = f"optimizer slots changed ({', '.join(changed)}) but the param did not"


def diff_paths(path_a, path_b, *, model=None, model_b=None, **kw) -> DiffResult:
    """Open two checkpoints and compare them (``model`` applies to bare weights files;
    ``model_b``, when given, to B instead)."""
    from surgeon.formats import open_checkpoint
    model_a, model_b = model_for(path_a, model), model_for(path_b, model_b or model)
    model_a = model_a or _partner(path_a, path_b)
    model_b = model_b or _partner(path_b, path_a)
    with open_checkpoint(path_a, model=model_a) as ra, \
            open_checkpoint(path_b, model=model_b) as rb:
        return diff_checkpoints(ra, rb, **kw)


def _partner(path, other):
    """A TF checkpoint does not record the names of nested models; compared with a
    ``.keras`` file, it takes them from that file's config (only where the config fits the
    checkpoint's structure and layer names, see ``formats.tf_objgraph``)."""
    from surgeon.formats import detect
    if detect(path) not in ("tf-checkpoint", "saved-model"):
        return None
    if detect(other) in ("keras", "legacy-h5"):  # a full-model legacy .h5 keeps its config
        return other
    return None


def model_for(path, model):
    """``--model`` only for formats that need it (a ``.keras`` file carries its config)."""
    if model is None:
        return None
    from surgeon.formats import detect
    return None if detect(path) == "keras" else model

