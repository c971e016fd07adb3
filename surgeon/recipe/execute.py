"""Execute a plan by streaming: read one tensor, transform it and its slots, write, drop.

Untouched tensors are copied by the writer without being decoded. Peak memory is the
largest touched tensor plus its slots.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from surgeon.ops import registry
from surgeon.ops.base import slot_power
from surgeon.ops.cast import np_dtype


@dataclass
class Stats:
    tensors: int = 0
    slots: int = 0
    bytes: int = 0
    seconds: float = 0.0
    bytes_written: int | None = None  # in place: bytes written into the file


def _groups(steps):
    out = {}
    for s in steps:
        out.setdefault(s.target, []).append(s)
    return out


def run(plan, ctx, writer, progress=None, executor=None) -> Stats:
    """Apply ``plan`` through ``writer`` (which copies every untouched tensor on finalize).

    ``executor`` (``surgeon.recipe.executors``) computes the groups; whatever it is, the
    writer receives the same writes in the same (plan) order."""
    from .executors import LocalExecutor
    t0, stats = time.perf_counter(), Stats()
    groups = list(_groups(plan.steps).items())
    executor = executor or LocalExecutor()
    for i, (target, value, changed, extras) in enumerate(executor.map(ctx, groups, _SlotState, writer)):
        for path, arr in extras:
            writer.add_extra(path, arr)
        _write(writer, target, value)
        stats.tensors += 1
        stats.bytes += value.nbytes
        for name, arr in changed.items():
            _write(writer, name, arr)
            stats.slots += 1
            stats.bytes += arr.nbytes
        if progress:
            progress(i + 1, len(groups), target)
    if plan.iteration:
        write_iteration(plan.iteration, ctx.reader, writer)
    stats.seconds = time.perf_counter() - t0
    return stats


def _write(writer, name, value):
    """Write ``value``, or take in a tensor a pool worker already wrote (``Raw``)."""
    from .executors import Raw
    if isinstance(value, Raw):
        writer.absorb(value.done)
    else:
        writer.write(name, value)


def write_iteration(iteration, reader, writer):
    """The optimizer's iteration counter as the plan sets it (stored dtype kept)."""
    old = reader.read(iteration["target"])
    writer.write(iteration["target"], np.asarray(iteration.get("stored", iteration["after"]),
                                                 dtype=old.dtype))


class _SlotState:
    """The slots of one target, read lazily, transformed by each step's policy."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.changed = {}

    def current(self, name):
        if name not in self.changed:
            self.changed[name] = self.ctx.reader.read(name)
        return self.changed[name]

    def apply(self, name, policy, res):
        if policy == "keep":
            return
        e = self.ctx.by_name[name]
        kind = e.slot
        if policy == "reset" and res.touched is None and kind != "average":
            dt = self.changed[name].dtype if name in self.changed else np_dtype(e.dtype)
            self.changed[name] = np.zeros(e.shape, dt)
        elif policy in ("reset", "warm") and kind == "average":
            # an EMA copy restarts at the edited weight (zero would drag the average, and
            # with ema_overwrite_frequency the weights, towards 0)
            cur = np.array(self.current(name))
            touched = np.ones(e.shape, bool) if res.touched is None else res.touched
            cur[touched] = np.asarray(res.value).astype(cur.dtype)[touched]
            self.changed[name] = cur
        elif policy in ("reset", "warm"):
            cur = np.array(self.current(name))
            touched = np.ones(e.shape, bool) if res.touched is None else res.touched
            fill = 0.0
            if policy == "warm" and slot_power(kind) == 2:
                fill = float(np.mean(cur.astype(np.float64))) if cur.size else 0.0
            cur[touched] = fill
            self.changed[name] = cur
        elif policy == "follow":
            self.changed[name] = res.follow(kind, self.current(name))
        elif policy == "transplant":
            cur = self.current(name)
            src = res.source_slot(kind) if res.source_slot else None
            self.changed[name] = np.zeros_like(cur) if src is None else np.asarray(src).astype(cur.dtype)


def open_output(out, reader, plan, patch=True, clone=None, defer=False):
    """The writer for ``plan``'s output: clone-and-patch when no tensor changes dtype
    (fastest, every other byte is the input's), else the rebuilding lossless writer.
    ``clone``: a ``BackgroundClone`` of the input the patch writer may adopt. ``defer``:
    the output is checked now but the writer opened at its first use (``_Deferred``), so
    that the first tensors are computed while the clone is still being copied."""
    from surgeon.core import atomic
    from surgeon.formats import check_output_name, is_url, open_writer
    if is_url(out):  # an Orbax checkpoint on a kvstore (gs://...): its writer checks it
        return open_writer(out, like=reader)
    atomic.check_output(out, [] if is_url(reader.path) else [reader.path])
    check_output_name(out, reader.format, reader.path)

    def make():
        if patch and all(s.dtype == s.new_dtype for s in plan.steps):
            from surgeon.formats.keras_patch import open_patch_writer
            writer = open_patch_writer(out, reader, clone)
            if writer is not None:
                return writer
        return open_writer(out, like=reader)
    return _Deferred(make) if defer else make()


class _Deferred:
    """A writer opened by its first use (any attribute): opening a clone-and-patch writer
    waits for the clone's copy, which computing the first tensors need not wait for."""

    def __init__(self, make):
        self._make, self._writer = make, None

    def __getattr__(self, name):
        if self._writer is None:
            self._writer = self._make()
        return getattr(self._writer, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._writer is not None:
            return self._writer.__exit__(*exc)


def apply(recipe, dry_run=False, progress=None, hash_inputs=True, make_dirs=False, patch=True,
          origin=None, structural=(), executor=None, early=None):
    """Plan ``recipe`` and (unless ``dry_run``) write its output, with provenance embedded.

    Args:
        recipe: a loaded ``Recipe`` (overrides already applied).
        dry_run: only plan; nothing is read beyond the structure, nothing is written.
        progress: optional callable ``(done, total, name)``.
        hash_inputs: record sha256 content hashes of the inputs in the provenance.
        make_dirs: create the output's parent directory when missing.
        patch: allow the clone-and-patch writer (False: always rebuild the file).
        origin: the checkpoint the recipe started from, when structural ops staged an
            intermediate model as ``recipe.input`` (provenance names and hashes the origin).
        structural: the structural plans already run to make that intermediate (recorded
            in the plan and its provenance).
        executor: who computes the tensors (``surgeon.recipe.executors.make_executor``:
            local, pool or ray); the output is the same whichever runs it.
        early: a ``surgeon.formats.clone.EarlyStart`` the caller began before loading
            the recipe (its hashes and clone are adopted; the caller closes it).
    Returns:
        ``(plan, stats)``; ``stats`` is None for a dry run.
    Example:
        >>> plan, stats = apply(load_recipe("recipes/reset_head.py"))
    """
    from surgeon.formats import provenance
    from surgeon.recipe import structural as recipe_ops
    if not dry_run and recipe.output:  # refuse before any work
        _check_output(recipe, origin)
    rewrites, rest = recipe_ops.split(recipe)
    if rewrites:
        # Whole-model rewrites first (into a private temp dir), then the tensor ops on the result.
        import dataclasses
        with recipe_ops.Workdir() as work:
            current, splans = recipe_ops.run(recipe.input, rewrites, work)
            staged = dataclasses.replace(recipe, input=current, ops=tuple(rest))
            plan, stats = apply(staged, dry_run, progress, hash_inputs, make_dirs, patch,
                                origin=recipe.input, structural=splans, executor=executor,
                                early=early)
        plan.input = recipe.input
        return plan, stats

    use_early = early is not None and early.hasher.enabled and hash_inputs and not dry_run
    hasher = early.hasher if use_early else provenance.Hasher(hash_inputs and not dry_run)
    first = origin or recipe.input
    clone = None
    try:
        if first and "://" not in str(first) and os.path.exists(first):  # hash while planning
            hasher.start(first)
        clone = None if dry_run or not patch else _early_clone(recipe, early)
        return _apply_opened(recipe, dry_run, progress, make_dirs, patch, first, structural,
                             hasher, clone, executor)
    finally:
        if clone is not None:
            clone.discard()
        hasher.close()


def _early_clone(recipe, early=None):
    """Start copying the input to the output's temp file now, when the output will most
    likely be a clone-and-patch of it (no op changes a dtype; a patchable file), so that
    the copy overlaps importing, opening and planning; None otherwise. A clone ``early``
    began from the command line is adopted when it is that copy."""
    from surgeon.formats.clone import BackgroundClone, clone_length
    out, inp = recipe.output, recipe.input
    started = early.take_clone(inp, out) if early is not None and inp and out else None
    length = False if not out or not inp or "://" in str(out) + str(inp) \
        or not os.path.isdir(os.path.dirname(os.path.abspath(out))) \
        or any(op.op == "cast" for op in recipe.ops) else clone_length(inp)
    if length is False:
        if started is not None:
            started.discard()
        return None
    return started or BackgroundClone(inp, out, length)


def _apply_opened(recipe, dry_run, progress, make_dirs, patch, first, structural, hasher,
                  clone=None, executor=None):
    from pathlib import Path

    from surgeon.core import __version__, atomic
    from surgeon.core.errors import RecipeError
    from surgeon.formats import provenance
    from .executors import LocalExecutor
    from .plan import PlanContext, make_plan, model_json_for, open_input

    with open_input(recipe) as reader:
        ctx = PlanContext(recipe, reader, model_json_for(recipe))
        try:
            if hasattr(executor, "check"):  # refuse what it cannot run before any work
                executor.check(reader, recipe.output)
            plan = make_plan(recipe, ctx)
            plan.structural = list(structural)
            if dry_run:
                return plan, None
            for src in [first, *ctx.sources]:
                hasher.start(src)
            if not plan.output:
                raise RecipeError(f"{recipe.path}: the recipe names no output; pass -o OUT")
            from surgeon.formats import is_url
            out = plan.output if is_url(plan.output) else Path(plan.output)
            if make_dirs and not is_url(out):
                out.parent.mkdir(parents=True, exist_ok=True)
            inputs = {"input": first} | {f"source:{p}": p for p in ctx.sources}
            if not is_url(out):
                atomic.check_output(out, [p for p in (first, recipe.model, *ctx.sources)
                                          if p is None or not is_url(p)])
            record = lambda: provenance.make_record(recipe, plan, inputs, __version__, hasher)  # noqa: E731
            if getattr(executor, "shards_output", False):  # Ray: each task writes a shard
                return plan, executor.run_sharded(plan, ctx, out, record, first, progress)
            executor = executor or LocalExecutor()
            local = type(executor) is LocalExecutor
            with open_output(out, reader, plan, patch, clone, defer=local) as writer:
                stats = run(plan, ctx, writer, progress, executor)
                history = provenance.read_log(first)
                provenance.embed(writer, reader.format, history + [record() | {"executor": executor.info()}])
                writer.finalize()
            return plan, stats
        finally:
            ctx.close()


def _check_output(recipe, origin=None):
    """The output is not an input, and its name announces the format apply writes (the
    input's)."""
    from surgeon.core import atomic
    from surgeon.formats import check_output_name, detect
    first = origin or recipe.input
    atomic.check_output(recipe.output, [first, recipe.input, recipe.model])
    inp = recipe.input
    if inp and origin is None and (os.path.exists(inp) or os.path.exists(f"{inp}.index")):
        check_output_name(recipe.output, detect(inp), inp)
