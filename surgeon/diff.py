"""Compare two checkpoints tensor by tensor, streaming (one pair at a time, in chunks).

The library never prints; ``surgeon.report`` renders a :class:`DiffResult` as text,
markdown, JSON or a PNG. Statistics are accumulated in float64 over chunks read along
axis 0, so peak memory is bounded by the chunk size, not by the checkpoint.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import SurgeonError

CHUNK_BYTES = 2 << 20
STATUSES = ("equal", "changed", "reshaped", "retyped", "added", "removed")
SAMPLE_PER_TENSOR = 4096


# -- streaming helpers (shared with surgeon.audit) ---------------------------------------
def iter_chunks(reader, name, max_bytes=CHUNK_BYTES):
    """Yield ``name``'s values in slices along axis 0 of about ``max_bytes`` each.

    Uses the reader's ``read_chunks`` when it has one; otherwise reads the tensor whole
    and slices it (the arithmetic is still chunked)."""
    chunked = getattr(reader, "read_chunks", None)
    if chunked is not None:
        yield from chunked(name, max_bytes)
        return
    arr = np.asarray(reader.read(name))
    if arr.ndim == 0 or arr.nbytes <= max_bytes:
        yield arr
        return
    step = max(1, max_bytes // max(1, arr.nbytes // arr.shape[0]))
    for i in range(0, arr.shape[0], step):
        yield arr[i:i + step]


def zip_flat(*streams):
    """Align several chunk streams of equally sized tensors: yield tuples of equal-length
    flat pieces (C order), whatever chunk boundaries each stream uses."""
    iters = [iter(s) for s in streams]
    bufs = [np.empty(0)] * len(iters)
    while True:
        for k, it in enumerate(iters):
            while bufs[k].size == 0:
                nxt = next(it, None)
                if nxt is None:
                    return
                bufs[k] = np.asarray(nxt).reshape(-1)
        m = min(b.size for b in bufs)
        yield tuple(b[:m] for b in bufs)
        bufs = [b[m:] for b in bufs]


def as_float(x) -> np.ndarray:
    return x.astype(np.float64, copy=False)


def numeric(x) -> np.ndarray:
    """``x`` itself for numpy's own numeric dtypes, else (bfloat16, ...) as float64."""
    return x if x.dtype.kind in "fiub" else as_float(x)


def fdot(x, y) -> float:
    """Float64 dot product of two flat arrays of numpy numeric dtypes. einsum casts in
    its inner loop (no float64 copies) and uses no BLAS threads (slow on a busy machine)."""
    return float(np.einsum("i,i->", x, y, dtype=np.float64, casting="unsafe"))


def finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# -- results ---------------------------------------------------------------------------
@dataclass
class TensorDiff:
    """The comparison of one canonical name."""

    name: str
    status: str
    role: str
    layer: str
    slot_of: str | None = None
    slot: str | None = None
    shape_a: tuple | None = None
    shape_b: tuple | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    size: int = 0
    n_changed: int = 0
    max_abs: float | None = None
    l2_diff: float | None = None
    norm_a: float | None = None
    norm_b: float | None = None
    dot: float | None = None
    flag: str | None = None
    sample: np.ndarray | None = None

    @property
    def rel_l2(self):
        if self.l2_diff is None or self.norm_a is None:
            return None
        if self.norm_a == 0:
            return 0.0 if self.l2_diff == 0 else None
        return self.l2_diff / self.norm_a

    @property
    def cosine(self):
        if self.dot is None or self.norm_a is None or self.norm_b is None:
            return None
        if self.norm_a == 0 or self.norm_b == 0:
            return 1.0 if self.norm_a == self.norm_b else None
        return max(-1.0, min(1.0, self.dot / (self.norm_a * self.norm_b)))

    @property
    def frac_changed(self):
        if self.status in ("added", "removed", "reshaped"):
            return None
        return self.n_changed / self.size if self.size else 0.0

    def to_json(self) -> dict:
        f = finite_or_none
        return {"name": self.name, "status": self.status, "role": self.role, "layer": self.layer,
                "slot_of": self.slot_of, "slot": self.slot,
                "shape_a": list(self.shape_a) if self.shape_a is not None else None,
                "shape_b": list(self.shape_b) if self.shape_b is not None else None,
                "dtype_a": self.dtype_a, "dtype_b": self.dtype_b, "size": self.size,
                "max_abs": f(self.max_abs), "rel_l2": f(self.rel_l2), "cosine": f(self.cosine),
                "frac_changed": f(self.frac_changed), "n_changed": self.n_changed,
                "l2_diff": f(self.l2_diff), "norm_a": f(self.norm_a), "norm_b": f(self.norm_b),
                "flag": self.flag}


@dataclass
class LayerDiff:
    """Aggregate over a layer's weights (params and states; slots excluded)."""

    layer: str
    tensors: int = 0
    differ: int = 0
    sq_diff: float = 0.0
    sq_a: float = 0.0
    uncompared: dict = field(default_factory=dict)  # status -> count (added/removed/reshaped)

    @property
    def rel_l2(self):
        """Undefined (None) when a weight of the layer has no B-A (added, removed,
        reshaped) or the layer's A is zero while B differs."""
        if self.uncompared:
            return None
        if self.sq_a == 0:
            return 0.0 if self.sq_diff == 0 else None
        return math.sqrt(self.sq_diff / self.sq_a)

    def why_undefined(self) -> str:
        """Why ``rel_l2`` is None, e.g. ``"removed"`` or ``"2 reshaped, 1 added"``."""
        if self.uncompared:
            if len(self.uncompared) == 1 and sum(self.uncompared.values()) == self.tensors:
                return next(iter(self.uncompared))
            return ", ".join(f"{n} {s}" for s, n in self.uncompared.items())
        return "A is zero" if self.rel_l2 is None else ""

    def to_json(self):
        return {"layer": self.layer, "tensors": self.tensors, "differ": self.differ,
                "rel_l2": finite_or_none(self.rel_l2), "uncompared": dict(self.uncompared)}


@dataclass
class DiffResult:
    """Everything ``surgeon diff`` reports."""

    a: dict
    b: dict
    atol: float
    rtol: float
    tensors: list = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return all(t.status == "equal" for t in self.tensors)

    def counts(self) -> dict:
        c = {s: 0 for s in STATUSES}
        for t in self.tensors:
            c[t.status] += 1
        return c

    def flags(self):
        return [t for t in self.tensors if t.flag]

    def layers(self) -> list:
        out = {}
        for t in self.tensors:
            if t.role not in ("param", "state"):
                continue
            ld = out.setdefault(t.layer, LayerDiff(t.layer))
            ld.tensors += 1
            ld.differ += t.status != "equal"
            if t.l2_diff is not None and t.norm_a is not None:
                ld.sq_diff += t.l2_diff ** 2
                ld.sq_a += t.norm_a ** 2
            elif t.status in ("added", "removed", "reshaped"):
                ld.uncompared[t.status] = ld.uncompared.get(t.status, 0) + 1
        return list(out.values())

    def to_json(self) -> dict:
        return {"equal": self.equal, "a": self.a, "b": self.b, "atol": self.atol, "rtol": self.rtol,
                "summary": self.counts() | {"tensors": len(self.tensors)},
                "tensors": [t.to_json() for t in self.tensors],
                "layers": [ld.to_json() for ld in self.layers()],
                "flags": [{"tensor": t.name, "message": t.flag} for t in self.flags()]}


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
    a_map = {}
    for e in ra.entries():
        new = rename(e.name)
        if _keep(e, new, rename(e.slot_of), only, ignore_optimizer):
            if new in a_map:
                raise SurgeonError(f"--map sends {a_map[new].name!r} and {e.name!r} to the same name {new!r}")
            a_map[new] = e
    b_map = {e.name: e for e in rb.entries() if _keep(e, e.name, e.slot_of, only, ignore_optimizer)}
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
    return result


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
    from .formats import open_checkpoint
    with open_checkpoint(path_a, model=model_for(path_a, model)) as ra, \
            open_checkpoint(path_b, model=model_for(path_b, model_b or model)) as rb:
        return diff_checkpoints(ra, rb, **kw)


def model_for(path, model):
    """``--model`` only for formats that need it (a ``.keras`` file carries its config)."""
    if model is None:
        return None
    from .formats import detect
    return None if detect(path) == "keras" else model

