"""Streaming arithmetic shared by diff, series and audit: chunked reads, aligned flat pieces,
float64 accumulation without float64 copies."""
from __future__ import annotations

import math

import numpy as np

CHUNK_BYTES = 2 << 20


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
