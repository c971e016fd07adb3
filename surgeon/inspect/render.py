"""Text rendering of library results for the CLI (the library itself never prints)."""
from __future__ import annotations

import numpy as np


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _itemsize(dtype: str) -> int:
    if dtype == "bfloat16":
        return 2
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        return 0


def ls_json(meta: dict, entries) -> dict:
    """The stable ``surgeon ls --json`` object."""
    return {"format": meta["format"], "path": meta.get("path"), "optimizer": meta.get("optimizer"),
            "notes": meta.get("notes", []),
            "entries": [e.to_json() | {"bytes": e.size * _itemsize(e.dtype)} for e in entries]}


def ls_text(meta: dict, entries) -> str:
    """A tree: layer -> weights (shape, dtype, params, bytes, slots); optimizer; totals."""
    slots = {}
    for e in entries:
        if e.role == "slot" and e.slot_of:
            slots.setdefault(e.slot_of, []).append(e.slot)
    lines = [f"{meta.get('path')}  [{meta['format']}]"]
    layer = None
    total_params = total_bytes = 0
    for e in entries:
        if e.role in ("slot", "optimizer"):
            continue
        if e.layer != layer:
            layer = e.layer
            lines.append(f"{layer or '(model)'}/")
        nbytes = e.size * _itemsize(e.dtype)
        total_params += e.size
        total_bytes += nbytes
        shape = "x".join(str(d) for d in e.shape) or "scalar"
        tags = e.role + (" frozen" if e.frozen else "")
        sl = ",".join(slots.get(e.name, [])) or "-"
        leaf = e.name[len(layer) + 1:] if layer else e.name
        lines.append(f"  {leaf:<24} {shape:<16} {e.dtype:<9} {e.size:>10,} {human_bytes(nbytes):>9}"
                     f"  {tags:<13} slots: {sl}")
    opt = meta.get("optimizer")
    slot_entries = [e for e in entries if e.role == "slot"]
    slot_bytes = sum(e.size * _itemsize(e.dtype) for e in slot_entries)
    unresolved = [e for e in slot_entries if not e.slot_of]
    if opt:
        lines.append(f"optimizer: {opt.get('class_name') or opt['name']} (stored as {opt['name']}), "
                     f"iterations={opt.get('iterations')}, learning_rate={opt.get('learning_rate') if opt.get('learning_rate') is None else format(opt['learning_rate'], '.6g')}, "
                     f"{len(slot_entries)} slot tensors ({human_bytes(slot_bytes)})"
                     + (f", {len(unresolved)} unresolved" if unresolved else ""))
        if opt.get("wrapper"):
            lines.append(f"  wrapped in {opt['wrapper']} (mixed precision): loss scale "
                         f"{opt.get('loss_scale')}, state under optimizer/loss_scale/")
    else:
        lines.append("optimizer: none stored")
    for note in meta.get("notes", []):
        lines.append(f"note: {note}")
    lines.append(totals_line(entries, total_params, total_bytes))
    return "\n".join(lines)


def totals_line(entries, values, nbytes) -> str:
    """``total: 12 weights, 327 values, 1.3 KB; 8 params with optimizer slots; 30 tensors in
    all (16 slots, 2 optimizer globals)`` -- each count is what its words say."""
    n_weights = sum(1 for e in entries if e.role in ("param", "state"))
    n_slots = sum(1 for e in entries if e.role == "slot")
    n_globals = sum(1 for e in entries if e.role == "optimizer")
    with_slots = len({e.slot_of for e in entries if e.role == "slot" and e.slot_of})
    extra = ", ".join(([f"{n_slots} slot{'s' * (n_slots != 1)}"] if n_slots else []) +
                      ([f"{n_globals} optimizer global{'s' * (n_globals != 1)}"] if n_globals else []))
    return (f"total: {n_weights} weights, {values:,} values, {human_bytes(nbytes)}; "
            f"{with_slots} params with optimizer slots; {len(entries)} tensors in all"
            + (f" ({extra})" if extra else ""))
