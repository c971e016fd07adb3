"""Ray for outputs whose shards surgeon chooses: TF bundles and Orbax checkpoints.

A Keras sharded index fixes its shards (``ray_shards``); a TF bundle's data files and an
Orbax checkpoint's per-process databases are the writer's choice. The plan is cut into
``n`` parts of about ``shard_bytes`` each (``partition``): a group (a target and the slots
it writes) and the iteration counter stay whole, the untouched tensors are spread so that
parts weigh about the same, every storage key in exactly one part. Each Ray task computes
its groups (``executors.compute``, as locally), copies its untouched keys and writes them
through its format's per-shard writer into the driver's temp directory: bundle parts
(``tf_bundle_shards``) or ``ocdbt.process_<k>/`` (``orbax_shards``). The driver then
writes the index (``MergeV2Checkpoints``) or merges the databases into the root manifest
and writes the metadata and surgery log, and publishes with one rename. A task that
still fails after Ray's retries fails the run in one line and the temp directory is
removed: nothing appears at the target.
"""
from __future__ import annotations

import math
import os
import time

from surgeon.core.errors import SurgeonError

SHARD_BYTES = 1 << 30  # default bytes per task (--executor ray on a TF bundle or Orbax)


class _Bundle:
    """TF checkpoints and SavedModel variables: parts merged by the driver."""

    def __init__(self, reader):
        self.reader = reader

    def keys_of(self, name):
        return self.reader.keys_of(name)

    def sizes(self) -> dict:
        return {k: _nbytes(shape, dtype) for k, (shape, dtype) in self.reader.keys.items()}

    def open(self, out):
        from surgeon.formats.tf_bundle_writer import BundleWriter
        return BundleWriter(self.reader, out)

    @staticmethod
    def folder(writer) -> str:
        return str(writer._tmp)

    @staticmethod
    def task_writer(reader, folder, index):
        from surgeon.formats.tf_bundle_shards import BundlePartWriter
        return BundlePartWriter(reader, folder, index)

    def publish(self, writer, results, history):
        from surgeon.formats import provenance
        provenance.embed(writer, self.reader.format, history)  # a bundle has no room: no-op
        return writer.finalize_parts([p for r in results for p in r["written"]])


class _Orbax(_Bundle):
    """Orbax: one OCDBT database per task, merged into the root manifest by the driver."""

    def keys_of(self, name):
        return [self.reader.entry(name).key]

    def sizes(self) -> dict:
        by_key = {e.key: e for e in self.reader.entries()}
        return {leaf.key: (_nbytes(by_key[leaf.key].shape, by_key[leaf.key].dtype)
                           if leaf.key in by_key else 0) for leaf in self.reader.leaves}

    def open(self, out):
        from surgeon.formats.orbax_writer import OrbaxWriter
        return OrbaxWriter(self.reader, out)

    @staticmethod
    def folder(writer) -> str:
        return str(writer._item)

    @staticmethod
    def task_writer(reader, folder, index):
        from surgeon.formats.orbax_shards import OrbaxShardWriter
        return OrbaxShardWriter(reader, folder, index)

    def publish(self, writer, results, history):
        from surgeon.formats import provenance
        from surgeon.formats.orbax_shards import merge_processes
        merge_processes(writer, [r["shard"] for r in results])
        provenance.embed(writer, self.reader.format, history)
        return writer.finalize()


LAYOUTS = {"tf-checkpoint": _Bundle, "saved-model": _Bundle, "orbax": _Orbax}


def _nbytes(shape, dtype) -> int:
    from .executors import _itemsize
    return math.prod(int(d) for d in shape) * _itemsize(dtype)


def partition(layout, groups, iteration, shard_bytes=SHARD_BYTES) -> list:
    """The plan cut into parts ``{"groups": [(target, steps)] in plan order, "iteration":
    bool, "copy": [untouched keys]}``: ``ceil(total bytes / shard_bytes)`` of them (at
    least one, at most one per unit), units placed heaviest first into the lightest part."""
    units, owner = [], {}

    def add(keys, group=None, it=False):
        keys = set(keys)
        merged = sorted({owner[k] for k in keys if k in owner})
        unit = {"groups": [], "keys": set(), "iteration": False}
        for u in merged:  # units sharing a key become one (one writer per key)
            unit["groups"] += units[u]["groups"]
            unit["keys"] |= units[u]["keys"]
            unit["iteration"] |= units[u]["iteration"]
            units[u] = None
        unit["groups"] += [group] if group is not None else []
        unit["keys"] |= keys
        unit["iteration"] |= it
        units.append(unit)
        for k in unit["keys"]:
            owner[k] = len(units) - 1

    for i, (target, steps) in enumerate(groups):
        names = [target] + [n for s in steps for n, p in s.slots if p != "keep"]
        add([k for n in names for k in layout.keys_of(n)], group=i)
    if iteration:
        add(layout.keys_of(iteration["target"]), it=True)
    sizes = layout.sizes()
    units = [u for u in units if u is not None]
    units += [{"groups": [], "keys": {k}, "iteration": False, "copy": True}
              for k in sorted(sizes) if k not in owner]
    total = sum(sizes.values())
    n = max(1, min(len(units), math.ceil(total / max(1, int(shard_bytes)))))
    weight = lambda u: sum(sizes.get(k, 0) for k in u["keys"])  # noqa: E731
    parts = [{"groups": [], "iteration": False, "copy": [], "bytes": 0} for _ in range(n)]
    for u in sorted(units, key=lambda u: (-weight(u), min(u["keys"]))):
        p = min(parts, key=lambda p: p["bytes"])
        p["bytes"] += weight(u)
        p["groups"] += u["groups"]
        p["iteration"] |= u["iteration"]
        p["copy"] += sorted(u["keys"]) if u.get("copy") else []
    return [{"groups": [groups[i] for i in sorted(p["groups"])], "iteration": p["iteration"],
             "copy": sorted(p["copy"]), "bytes": p["bytes"]} for p in parts]


def run_parts(ex, plan, ctx, out, record, first, progress=None):
    """``RayExecutor.run_sharded`` for TF bundles and Orbax (see the module docstring)."""
    from surgeon.formats import provenance
    from .execute import Stats, _groups
    from .ray_shards import _absolute
    ex._connect()
    t0 = time.perf_counter()
    layout = LAYOUTS[ctx.reader.format](ctx.reader)
    parts = partition(layout, list(_groups(plan.steps).items()), plan.iteration, ex.shard_bytes)
    writer = layout.open(out)
    try:
        n, label = len(parts), os.path.basename(str(out).rstrip("/"))
        recipe, cwd, folder = _absolute(ctx.recipe), os.getcwd(), layout.folder(writer)
        results = ex.run_tasks(part_task, [
            (recipe, cwd, k, folder, parts[k], plan.iteration, ex.pause) for k in range(n)],
            [f"{k + 1} of {n} of {label}" for k in range(n)], progress)
        layout.publish(writer, results, provenance.read_log(first) + [record() | {"executor": ex.info()}])
    except BaseException:
        writer.abort()
        raise
    return Stats(sum(r["tensors"] for r in results), sum(r["slots"] for r in results),
                 sum(r["bytes"] for r in results), time.perf_counter() - t0)


def part_task(recipe, cwd, index, folder, part, iteration, pause=0.0) -> dict:
    """A Ray task: write part ``index`` of ``recipe``'s output into ``folder``."""
    from .execute import _SlotState, write_iteration
    from .executors import compute
    from .ray_shards import task_frame
    writer_for = lambda r: LAYOUTS[r.format].task_writer(r, folder, index)  # noqa: E731
    with task_frame(recipe, cwd, index, writer_for) as (ctx, writer, out):
        reader = ctx.reader
        for target, steps in part["groups"]:
            value, changed, extras = compute(ctx, target, steps, _SlotState)
            if extras:
                raise SurgeonError(f"{reader.path}: {reader.format} has no room for "
                                   f"{', '.join(p for p, _ in extras)}")
            for name, arr in [(target, value), *changed.items()]:
                writer.write(name, arr)
                out["tensors" if name == target else "slots"] += 1
                out["bytes"] += arr.nbytes
            pause = _pause(pause)
        if part["iteration"]:
            write_iteration(iteration, reader, writer)
        for key in part["copy"]:
            writer.copy_key(key)
            pause = _pause(pause)
        out["written"] = writer.close()
    return out


def _pause(seconds) -> float:
    """Sleep ``seconds`` once, after a task's first write (fault tests kill it there)."""
    if seconds:
        time.sleep(seconds)
    return 0.0
