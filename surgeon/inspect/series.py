"""``surgeon diff --series``: per-layer drift of the weights over a run of checkpoints."""
from __future__ import annotations

import re
from dataclasses import dataclass

from surgeon.core.errors import SurgeonError
from surgeon.inspect.diff import _keep, diff_checkpoints, model_for
from surgeon.inspect.stream import CHUNK_BYTES, finite_or_none


@dataclass
class SeriesResult:
    """Per-layer drift over checkpoints: ``drift[layer][i]`` is the relative L2 change of
    the layer's weights from checkpoint 0 to i; ``step[layer][i]`` from i-1 to i."""

    paths: list
    iterations: list
    layers: list
    drift: dict
    step: dict

    def to_json(self) -> dict:
        f = finite_or_none
        return {"checkpoints": [{"path": p, "iteration": it} for p, it in zip(self.paths, self.iterations)],
                "layers": [{"layer": ly, "drift": [f(x) for x in self.drift[ly]],
                            "step": [f(x) for x in self.step[ly]]} for ly in self.layers]}


def _natural(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def expand_series(paths):
    """A directory becomes its checkpoints in natural order (``ckpt-2`` before ``ckpt-10``):
    TF prefixes (``*.index``) or ``.keras`` / ``.weights.h5`` / ``.h5`` files."""
    from pathlib import Path
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir() and not (p / "saved_model.pb").exists():
            found = [q.with_suffix("") for q in p.glob("*.index")] or \
                [q for q in p.iterdir() if q.name.endswith((".keras", ".weights.h5", ".h5", ".hdf5"))]
            if not found:
                raise SurgeonError(f"{p}: directory holds no checkpoints for --series")
            out.extend(sorted(found, key=_natural))
        else:
            out.append(p)
    if len(out) < 2:
        raise SurgeonError(f"--series needs at least 2 checkpoints, got {len(out)}")
    return [str(p) for p in out]


def _layer_rel(result):
    return {ld.layer: ld.rel_l2 for ld in result.layers()}


def diff_series(paths, *, model=None, only=None, chunk_bytes=CHUNK_BYTES) -> SeriesResult:
    """Drift of every layer's weights over a run (checkpoint 0 as the reference)."""
    from surgeon.formats import open_checkpoint
    paths = expand_series(paths)
    kw = dict(only=only, ignore_optimizer=True, chunk_bytes=chunk_bytes)
    first = open_checkpoint(paths[0], model=model_for(paths[0], model))
    prev, iterations = None, [_iteration(first)]
    layers, drift, step = [], {}, {}
    try:
        for e in first.entries():
            if e.role in ("param", "state") and _keep(e, e.name, None, only, True) and e.layer not in drift:
                layers.append(e.layer)
                drift[e.layer], step[e.layer] = [0.0], [None]
        prev = first
        for p in paths[1:]:
            cur = open_checkpoint(p, model=model_for(p, model))
            iterations.append(_iteration(cur))
            d0, d1 = _layer_rel(diff_checkpoints(first, cur, **kw)), _layer_rel(diff_checkpoints(prev, cur, **kw))
            for ly in layers:
                drift[ly].append(d0.get(ly))
                step[ly].append(d1.get(ly))
            if prev is not first:
                prev.close()
            prev = cur
    finally:
        first.close()
        if prev is not None and prev is not first:
            prev.close()
    return SeriesResult(paths, iterations, layers, drift, step)


def _iteration(reader):
    opt = reader.metadata().get("optimizer") or {}
    return opt.get("iterations")
