"""Rendering of diff / series / audit results: text, markdown and PNG plots.

The library computes (``surgeon.inspect.diff``, ``surgeon.inspect.audit``); this module only formats.
Plots use matplotlib's object API (no pyplot, no global state); matplotlib is the
optional extra ``surgeon[plot]``.
"""
from __future__ import annotations

import os

from surgeon.core.errors import SurgeonError

PLOT_SIZE = (1200, 500)  # pixels (width, height) of every PNG
DPI = 100


def _g(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def _pct(t):
    return "-" if t.frac_changed is None else f"{100 * t.frac_changed:.1f}%"


def _opt(side):
    o = side.get("optimizer")
    if not o:
        return "no optimizer state"
    lr = o.get("learning_rate")
    return (f"optimizer {o.get('class_name') or o.get('name')} iterations={o.get('iterations')} "
            f"learning_rate={'-' if lr is None else format(lr, '.6g')}")


def diff_summary(result) -> str:
    """The one-line summary printed first."""
    c = result.counts()
    n = len(result.tensors)
    tol = f"atol={result.atol:g}, rtol={result.rtol:g}"
    assets = getattr(result, "assets", [])
    if assets:
        what = ", ".join(f"{m} {st}" for m, st in assets[:3]) + (" ..." if len(assets) > 3 else "")
        head = "tensors equal" if all(t.status == "equal" for t in result.tensors) else "different"
        return f"{head}, but {len(assets)} asset file(s) differ ({what}) ({tol})"
    if result.equal:
        return f"equal: {n} tensors compared, none differ ({tol})"
    parts = ", ".join(f"{c[s]} {s}" for s in ("changed", "reshaped", "retyped", "added", "removed") if c[s])
    worst = max((t for t in result.tensors if t.max_abs is not None), key=lambda t: t.max_abs, default=None)
    tail = f"; largest |B-A| {worst.max_abs:.3g} in {worst.name}" if worst and worst.max_abs else ""
    return f"different: {n - c['equal']} of {n} tensors differ ({parts}){tail} ({tol})"


def _leaf(t):
    if t.role == "slot" and t.slot_of:
        base = t.slot_of[len(t.layer) + 1:] if t.layer and t.slot_of.startswith(t.layer + "/") else t.slot_of
        return f"{base} [{t.slot}]"
    return t.name[len(t.layer) + 1:] if t.layer and t.name.startswith(t.layer + "/") else t.name


def _groups(result, show_all):
    groups = {}
    for t in result.tensors:
        if show_all or t.status != "equal" or t.flag:
            groups.setdefault(t.layer or "(model)", []).append(t)
    return groups


def _shape_note(t):
    if t.status == "reshaped":
        return f"{tuple(t.shape_a)} -> {tuple(t.shape_b)}"
    if t.status == "retyped":
        return f"{t.dtype_a} -> {t.dtype_b}"
    return ""


def _layer_rel(ld):
    return _g(ld.rel_l2) if ld.rel_l2 is not None else f"n/a ({ld.why_undefined()})"


def diff_text(result, show_all=False) -> str:
    """Summary line, both sides, then a table grouped by layer (differing tensors only
    unless ``show_all``), then flags."""
    lines = [diff_summary(result),
             f"A: {result.a['path']} [{result.a['format']}]  {_opt(result.a)}",
             f"B: {result.b['path']} [{result.b['format']}]  {_opt(result.b)}"]
    groups = _groups(result, show_all)
    if groups:
        lines.append(f"  {'tensor':<30} {'status':<9} {'max|B-A|':>9} {'rel_l2':>9} {'cosine':>8} "
                     f"{'changed':>8} {'|A|':>9} {'|B|':>9}")
    layer_rel = {ld.layer: ld for ld in result.layers()}
    for layer, ts in groups.items():
        ld = layer_rel.get(layer)
        extra = f"  ({ld.differ} of {ld.tensors} weights differ, rel_l2 {_layer_rel(ld)})" if ld else ""
        lines.append(f"{layer}/{extra}")
        for t in ts:
            lines.append(f"  {_leaf(t):<30} {t.status:<9} {_g(t.max_abs):>9} {_g(t.rel_l2):>9} "
                         f"{_g(t.cosine, '.6f'):>8} {_pct(t):>8} {_g(t.norm_a):>9} {_g(t.norm_b):>9}"
                         + (f"  {_shape_note(t)}" if _shape_note(t) else ""))
    for t in result.flags():
        lines.append(f"flag: {t.name}: {t.flag}")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def diff_markdown(result, show_all=False) -> str:
    """A markdown report for pull requests and model cards."""
    lines = [f"**surgeon diff** — {diff_summary(result)}", "",
             f"- A: `{result.a['path']}` ({result.a['format']}), {_opt(result.a)}",
             f"- B: `{result.b['path']}` ({result.b['format']}), {_opt(result.b)}", ""]
    rows = [t for ts in _groups(result, show_all).values() for t in ts]
    if rows:
        lines += ["| tensor | status | max abs Δ | rel L2 | cosine | changed | ‖A‖ | ‖B‖ |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for t in rows:
            note = f" ({_shape_note(t)})" if _shape_note(t) else ""
            lines.append(f"| `{t.name}` | {t.status}{note} | {_g(t.max_abs)} | {_g(t.rel_l2)} | "
                         f"{_g(t.cosine, '.6f')} | {_pct(t)} | {_g(t.norm_a)} | {_g(t.norm_b)} |")
    flags = result.flags()
    if flags:
        lines += ["", "Flags:"] + [f"- `{t.name}`: {t.flag}" for t in flags]
    if result.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in result.notes]
    return "\n".join(lines)


def series_text(series) -> str:
    """Rows: layers; columns: checkpoints; cells: relative L2 drift from the first."""
    names = [os.path.basename(p.rstrip("/")) or p for p in series.paths]
    width = max(10, *(len(n) for n in names))
    lines = [f"drift of each layer's weights from {series.paths[0]} (relative L2 change)",
             f"{'layer':<28}" + "".join(f" {n:>{width}}" for n in names),
             f"{'(iteration)':<28}" + "".join(f" {str(i):>{width}}" for i in series.iterations)]
    for ly in series.layers:
        lines.append(f"{ly or '(model)':<28}" + "".join(f" {_g(x):>{width}}" for x in series.drift[ly]))
    return "\n".join(lines)


def series_markdown(series) -> str:
    names = [os.path.basename(p.rstrip("/")) or p for p in series.paths]
    lines = ["| layer | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for ly in series.layers:
        lines.append(f"| `{ly}` | " + " | ".join(_g(x) for x in series.drift[ly]) + " |")
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------
def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SurgeonError("--plot needs matplotlib, which is not installed: "
                           "pip install 'surgeon[plot]'") from None
    return Figure(figsize=(PLOT_SIZE[0] / DPI, PLOT_SIZE[1] / DPI), dpi=DPI)


def _save(fig, path):
    """Write the PNG like every other output: a temp beside it, fsync, atomic rename (a
    killed run never leaves a truncated image at ``path``)."""
    from pathlib import Path
    from surgeon.core import atomic
    target = Path(path)
    tmp = atomic.temp_path(target)
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        atomic.commit(tmp, target)
    except OSError as exc:
        raise SurgeonError(f"{path}: cannot write plot: {exc.strerror or exc}") from None
    finally:
        atomic.discard(tmp)
    return path


def plot_diff(result, path, max_layers=40):
    """Bar chart of per-layer relative change, histogram of element changes (B - A)."""
    import numpy as np
    fig = _figure()
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    layers = [ld for ld in result.layers() if ld.rel_l2 is not None]
    layers = sorted(layers, key=lambda ld: -ld.rel_l2)[:max_layers][::-1]
    ax1.barh([ld.layer or "(model)" for ld in layers], [ld.rel_l2 for ld in layers], color="tab:blue")
    ax1.set_xlabel("relative L2 change ‖B−A‖/‖A‖")
    ax1.set_title("per-layer change" + (f" (top {max_layers})" if len(layers) == max_layers else ""))
    ax1.tick_params(axis="y", labelsize=7)
    samples = [t.sample for t in result.tensors if t.sample is not None and t.role in ("param", "state")]
    data = np.concatenate(samples) if samples else np.zeros(0)
    data = data[np.isfinite(data)]
    if data.size:
        ax2.hist(data, bins=60, color="tab:orange", log=True)
    else:
        ax2.text(0.5, 0.5, "no weight changed", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("element change B−A (changed elements, sampled)")
    ax2.set_title("distribution of changes")
    fig.suptitle(os.path.basename(str(result.a["path"])) + " → " + os.path.basename(str(result.b["path"])))
    fig.tight_layout()
    return _save(fig, path)


def plot_series(series, path, max_layers=20):
    """Line chart: each layer's drift from the first checkpoint."""
    fig = _figure()
    ax = fig.subplots()
    xs = list(range(len(series.paths)))
    last = {ly: (series.drift[ly][-1] or 0.0) for ly in series.layers}
    for ly in sorted(series.layers, key=lambda ly: -last[ly])[:max_layers]:
        ax.plot(xs, [float("nan") if v is None else v for v in series.drift[ly]], marker="o", label=ly or "(model)")
    ax.set_xticks(xs)
    ax.set_xticklabels([os.path.basename(p.rstrip("/")) + ("" if it is None else f"\nit {it}")
                        for it, p in zip(series.iterations, series.paths)], fontsize=7)
    ax.set_xlabel("checkpoint (iteration)")
    ax.set_ylabel("relative L2 drift from first")
    ax.set_title("layer drift over the run")
    if series.layers:
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


# -- audit -----------------------------------------------------------------------------
def audit_text(result) -> str:
    """Headline with counts, then one line per finding (errors first)."""
    c = result.counts()
    head = f"audit {result.path} [{result.format}]: "
    if not result.findings:
        head += f"healthy, no findings ({result.checked} tensors checked)"
    else:
        head += (f"{c['error']} error(s), {c['warning']} warning(s), {c['info']} info "
                 f"({result.checked} tensors checked)")
    lines = [head]
    for f in result.sorted():
        lines.append(f"{f.severity:<8} {f.code:<18} {f.tensor or '-':<32} {f.message}")
    return "\n".join(lines)
