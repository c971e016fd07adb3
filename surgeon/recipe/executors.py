"""Executors: who computes a plan's tensors (``--executor local|pool|ray``).

Every executor computes the same thing, one target group at a time (the target tensor
read from the input, every step applied in plan order, its slots transformed by each
step's policy: ``compute``), so their outputs are identical. They differ in where:

- ``LocalExecutor`` (default): in this process, one group after the other.
- ``PoolExecutor``: in N worker processes on this machine, each with its own reader of
  the input; groups go out in chunks of a few MB, results come back in plan order, and
  this process writes them through the same writer as ``local`` (same bytes, same order).
  At most ``workers`` chunks are in flight, so peak memory stays bounded.
- ``RayExecutor`` (``surgeon.recipe.ray_shards``): one Ray task per output shard, each
  writing its own shard beside the target.
"""
from __future__ import annotations

import os
import socket
from collections import deque

from surgeon.core.errors import SurgeonError
from surgeon.ops import registry
from surgeon.ops.cast import np_dtype

NAMES = ("local", "pool", "ray")
CHUNK_BYTES = 8 << 20   # a pool task carries groups up to ~8 MB of tensors (and slots)
CHUNK_GROUPS = 128      # ... or this many groups (per-task overhead amortised)


def compute(ctx, target, steps, slot_state):
    """The new value of ``target`` after ``steps``, its changed slots ``{name: array}`` and
    the extras the ops store ``[(path, array)]`` (what ``run`` writes)."""
    value = ctx.reader.read(target)
    slots = slot_state(ctx)
    extras = []
    for step in steps:
        res = registry.OPS[step.op].apply(step, value, ctx)
        value = res.value
        for name, policy in step.slots:
            slots.apply(name, policy, res)
        extras.extend(res.extras.items())
    return value, slots.changed, extras


def group_bytes(ctx, target, steps) -> int:
    """Bytes a group reads and writes (the target and its slots), from the plan alone."""
    names = {target} | {n for s in steps for n, p in s.slots if p != "keep"}
    total = 0
    for n in names:
        e = ctx.by_name[n]
        size = 1
        for d in e.shape:
            size *= int(d)
        total += size * _itemsize(e.dtype)
    return total


def _itemsize(dtype) -> int:
    try:
        return np_dtype(dtype).itemsize
    except (TypeError, ValueError, KeyError, SurgeonError):
        return 4


class LocalExecutor:
    """Today's behaviour: every group computed in this process, in plan order."""

    name = "local"
    workers = 1

    def __init__(self):
        self.tasks = 0

    def map(self, ctx, groups, slot_state, writer=None):
        self.tasks = 1
        for target, steps in groups:
            yield (target, *compute(ctx, target, steps, slot_state))

    def info(self) -> dict:
        return {"name": self.name, "workers": self.workers, "tasks": self.tasks, "hosts": [socket.gethostname()]}

    def map_shards(self, fn, jobs, names, progress=None):
        """``[fn(job) for job in jobs]``, one task per output shard ``names[k]`` (convert's
        sharded targets); a result is a dict with at least ``host``."""
        out = []
        for k, job in enumerate(jobs):
            out.append(fn(job))
            if progress:
                progress(k + 1, len(jobs), names[k])
        self.tasks = len(jobs)
        return out


class PoolExecutor(LocalExecutor):
    """Groups computed by ``workers`` local processes; results yielded in plan order."""

    name = "pool"

    def __init__(self, workers=None):
        super().__init__()
        self.workers = int(workers or os.cpu_count() or 1)
        if self.workers < 1:
            raise SurgeonError(f"--workers must be >= 1, got {workers}")

    def map(self, ctx, groups, slot_state, writer=None):
        """Yield ``(target, value, changed slots, extras)`` in plan order; with a writer
        that can take raw writes (clone-and-patch), the workers write those tensors
        themselves and yield ``Raw`` markers in their place."""
        chunks = _chunks(ctx, groups)
        self.tasks = len(chunks)
        if self.workers == 1 or len(chunks) <= 1:
            yield from super().map(ctx, groups, slot_state, writer)
            self.tasks = 1
            return
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool
        import gc
        mp = _mp_context()
        init = (_worker_init, (ctx.recipe,))
        if mp.get_start_method() == "fork" and ctx.forkable():  # workers adopt the planned ctx
            _PARENT["ctx"], init = ctx, (_worker_adopt, ())
            gc.freeze()  # the workers' collections leave the parent's objects (and pages) alone
        with ProcessPoolExecutor(min(self.workers, len(chunks)), mp_context=mp,
                                 initializer=init[0], initargs=init[1]) as pool:
            todo, window = iter(chunks), deque()
            try:
                submit = lambda c: pool.submit(_worker_run, c, _sink_for(writer, c))  # noqa: E731
                for chunk in todo:  # at most one chunk per worker in flight (bounded memory)
                    window.append(submit(chunk))
                    if len(window) >= self.workers:
                        break
                while window:
                    done = window.popleft().result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        window.append(submit(nxt))
                    yield from done
            except BrokenProcessPool:
                raise SurgeonError("a worker process of --executor pool died (killed or out of "
                                   "memory); nothing was written; retry with fewer --workers") from None
            finally:
                if _PARENT.pop("ctx", None) is not None:
                    gc.unfreeze()
                for f in window:
                    f.cancel()

    def map_shards(self, fn, jobs, names, progress=None):
        """The shard tasks in ``workers`` local processes (results in order)."""
        if self.workers == 1 or len(jobs) <= 1:
            return LocalExecutor.map_shards(self, fn, jobs, names, progress)
        from concurrent.futures import ProcessPoolExecutor
        self.tasks, out = len(jobs), []
        with ProcessPoolExecutor(min(self.workers, len(jobs)), mp_context=_mp_context()) as pool:
            futures = [pool.submit(fn, job) for job in jobs]
            for k, f in enumerate(futures):
                try:
                    out.append(f.result())
                except Exception as exc:  # noqa: BLE001 (any task failure ends the run)
                    for g in futures:
                        g.cancel()
                    raise SurgeonError(_shard_failure(names[k], exc)) from None
                if progress:
                    progress(k + 1, len(jobs), names[k])
        return out


def _shard_failure(name, exc) -> str:
    """One line for a pool shard task that failed (the caller removes its temporaries)."""
    from concurrent.futures.process import BrokenProcessPool
    if isinstance(exc, BrokenProcessPool):
        why = "a worker process of --executor pool died (killed or out of memory)"
    else:
        lines = str(exc).strip().splitlines()
        why = str(exc) if isinstance(exc, SurgeonError) else \
            f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
    return f"shard {name}: {why}; nothing was written"


def _chunks(ctx, groups):
    out, cur, size = [], [], 0
    for target, steps in groups:
        b = group_bytes(ctx, target, steps)
        if cur and (size + b > CHUNK_BYTES or len(cur) >= CHUNK_GROUPS):
            out.append(cur)
            cur, size = [], 0
        cur.append((target, steps))
        size += b
    if cur:
        out.append(cur)
    return out


def _mp_context():
    """fork (fast start) unless TensorFlow is loaded (its threads do not survive a fork)."""
    import multiprocessing
    import sys
    method = "fork" if "tensorflow" not in sys.modules else "forkserver"
    return multiprocessing.get_context(method)


_WORKER = {}  # per worker process: its reader and plan context (set by _worker_init)
_PARENT = {}  # the parent's planned context, inherited by forked workers (_worker_adopt)


def _worker_adopt():
    """A forked worker takes the parent's planned context (no re-open, no re-parse of the
    input: ~1 ms per tensor on a many-tensor model) with HDF5 handles of its own."""
    ctx = _PARENT["ctx"]
    ctx.after_fork()
    _WORKER["ctx"] = ctx


def _worker_init(recipe):
    from .plan import PlanContext, model_json_for, open_input
    reader = open_input(recipe)
    _WORKER["ctx"] = PlanContext(recipe, reader, model_json_for(recipe))


def _worker_run(chunk, sink=None):
    from .execute import _SlotState
    ctx = _WORKER["ctx"]
    out = []
    try:
        for target, steps in chunk:
            value, changed, extras = compute(ctx, target, steps, _SlotState)
            if sink is not None:
                value = _raw(sink, target, value)
                changed = {n: _raw(sink, n, a) for n, a in changed.items()}
            out.append((target, value, changed, extras))
    finally:
        if sink is not None:
            sink.close()
    return out


class Raw:
    """A tensor a pool worker wrote into the output itself (``nbytes``; ``done``: the CRC
    changes for the writer to absorb)."""

    def __init__(self, nbytes, done):
        self.nbytes, self.done = nbytes, done


def _raw(sink, name, arr):
    done = sink.put(name, arr)
    return arr if done is None else Raw(arr.nbytes, done)


def _sink_for(writer, chunk):
    """A ``RawSink`` for the chunk's tensors when ``writer`` takes raw writes, else None."""
    if writer is None or not hasattr(writer, "raw_regions"):
        return None
    from surgeon.formats.rawpatch import RawSink
    names = [n for target, steps in chunk
             for n in [target, *(n for s in steps for n, p in s.slots if p != "keep")]]
    return RawSink(writer.sink.path, writer.raw_regions(names), writer.sink.crc)


def make_executor(name=None, workers=None, address=None, **ray_options):
    """The executor called ``name`` (``local``, ``pool`` or ``ray``).

    Args:
        name: ``local`` (default: one process), ``pool`` (local processes) or ``ray``.
        workers: processes (pool; default: the machine's cores) or concurrent Ray tasks
            (default: as many as the cluster schedules).
        address: the Ray cluster (``ray`` only; default: ``RAY_ADDRESS`` or a local one).
    Returns:
        An executor to pass to ``surgeon.apply(..., executor=...)``.
    Example:
        >>> ex = make_executor("pool", workers=4)
    """
    name = name or "local"
    if name not in NAMES:
        raise SurgeonError(f"unknown executor {name!r}; choose one of {', '.join(NAMES)}")
    if address is not None and name != "ray":
        raise SurgeonError("--address is for --executor ray only")
    if workers is not None and int(workers) < 1:
        raise SurgeonError(f"--workers must be >= 1, got {workers}")
    if name == "local":
        if workers not in (None, 1):
            raise SurgeonError("--workers needs --executor pool or ray")
        return LocalExecutor()
    if name == "pool":
        return PoolExecutor(workers)
    from .ray_shards import RayExecutor
    return RayExecutor(address=address, workers=workers, **ray_options)
