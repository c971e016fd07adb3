"""The Ray executor: a plan partitioned by output shard, one Ray task per shard.

Each task opens the input from its path (every worker must see the driver's paths: a
shared filesystem mounted at the same place), computes every group that writes into its
shard (``executors.compute``, as locally), and writes its shard into a temporary
directory beside the target. When every task has succeeded, the driver embeds the
surgery log (executor, task count, worker hosts) in the first shard, renames the shards
into place and writes the index last. A task whose worker dies is retried by Ray
(``retries``); if it still fails, the run fails with one line naming the shard and the
temporary directory is removed: nothing appears at the target.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path

from surgeon.core.errors import SurgeonError

INSTALL = "--executor ray needs Ray: pip install 'surgeon[ray]' (or pip install ray)"


def import_ray():
    """The ``ray`` module, or a one-line SurgeonError saying what to install."""
    try:
        import ray
    except ImportError:
        raise SurgeonError(INSTALL) from None
    return ray


class RayExecutor:
    """Runs one task per output shard on a Ray cluster (``address``; default: the
    ``RAY_ADDRESS`` cluster, or a local one started for this process)."""

    name = "ray"
    shards_output = True

    def __init__(self, address=None, workers=None, retries=3, pause=0.0, shard_bytes=None):
        from .ray_parts import SHARD_BYTES
        self.ray = import_ray()
        self.address = address
        self.workers = int(workers) if workers else None
        self.retries = int(retries)
        self.pause = float(pause)  # seconds a task sleeps after its first write (fault tests)
        self.shard_bytes = int(shard_bytes or SHARD_BYTES)  # per task, TF bundles and Orbax

    def check(self, reader, output):
        """Refuse outputs that are one file: a Ray task writes one shard."""
        from .ray_parts import LAYOUTS
        if reader.format in LAYOUTS:  # TF bundle, SavedModel, Orbax: shards of our choice
            return
        if reader.format != "keras-weights-sharded" or not str(output or "").endswith(".weights.json"):
            what = "one file" if reader.format != "keras-weights-sharded" else "not a sharded index"
            raise SurgeonError(
                f"{output}: --executor ray writes sharded outputs only, and {reader.path} / "
                f"{output} is {what}; use a Keras sharded checkpoint (save_weights(..., "
                "max_shard_size=...) -> .weights.json + shards) in and out, a TF checkpoint or "
                "an Orbax checkpoint, or --executor pool")

    def _connect(self):
        """The connected ``ray`` module; ``connect_seconds``: how long connecting took."""
        ray, t = self.ray, time.perf_counter()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False,
                         include_dashboard=False)
            except Exception as exc:  # noqa: BLE001 (a local node timing out is a bare Exception)
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise SurgeonError(f"cannot connect to the Ray cluster "
                                   f"{self.address or '(local)'}: {why}") from None
        self.connect_seconds = time.perf_counter() - t
        return ray

    def run_sharded(self, plan, ctx, out, record, first, progress=None):
        """Write ``plan``'s output at ``out`` (a ``.weights.json``) through Ray tasks."""
        if ctx.reader.format != "keras-weights-sharded":  # TF bundle, Orbax: ray_parts
            from .ray_parts import run_parts
            return run_parts(self, plan, ctx, out, record, first, progress)
        from surgeon.core import atomic
        from surgeon.formats import provenance
        from surgeon.formats.keras_sharded import publish_shards, shard_names
        from .execute import Stats, _groups
        self._connect()  # (starting a local cluster takes seconds: not the run's time)
        t0 = time.perf_counter()
        reader, out = ctx.reader, Path(out).absolute()
        rename = shard_names(reader, out)
        names = [rename[n] for n in reader.shard_names]
        parts = partition(reader, list(_groups(plan.steps).items()))
        recipe, cwd = _absolute(ctx.recipe), os.getcwd()
        tmpdir = atomic.temp_dir(out)
        try:
            results = self.run_tasks(shard_task, [
                (recipe, cwd, k, str(tmpdir / names[k]), parts[k], plan.iteration, self.pause)
                for k in range(len(names))], names, progress)
            history = provenance.read_log(first)
            _finish_first_shard(tmpdir / names[0], [x for r in results for x in r["extras"]],
                                history + [record() | {"executor": self.info()}])
            publish_shards(reader, rename, tmpdir, out)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        stats = Stats(sum(r["tensors"] for r in results), sum(r["slots"] for r in results),
                      sum(r["bytes"] for r in results), time.perf_counter() - t0)
        return stats

    def run_tasks(self, fn, args, names, progress=None) -> list:
        """``fn(*args[k])`` as one Ray task per output shard ``names[k]`` (at most ``workers``
        at once), results in order; ``info()`` then says what ran. A task that still fails
        after Ray's retries ends the run in one line naming its shard: the others are
        cancelled and waited for, so none still writes into the temporary directory that
        the caller then removes. The caller has connected (``_connect``)."""
        ray = self.ray
        task = ray.remote(max_retries=self.retries, retry_exceptions=False)(fn)
        pending, results, todo = {}, {}, list(range(len(args)))
        while todo or pending:
            while todo and len(pending) < (self.workers or len(args)):
                k = todo.pop(0)
                pending[task.remote(*args[k])] = k
            done, _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(done[0])
            try:
                results[k] = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 (any task failure ends the run)
                for ref in pending:
                    ray.cancel(ref, force=True)
                if pending:
                    ray.wait(list(pending), num_returns=len(pending), timeout=30)
                raise SurgeonError(_failure(names[k], exc, self.retries)) from None
            if progress:
                progress(len(results), len(args), names[k])
        out = [results[k] for k in range(len(args))]
        self.last_info = {"name": "ray", "address": self.address or os.environ.get("RAY_ADDRESS") or "local",
                          "workers": self.workers, "tasks": len(out), "retries": self.retries,
                          "hosts": sorted({r["host"] for r in out}),
                          "task_seconds": [round(r.get("seconds", 0.0), 3) for r in out],
                          "connect_seconds": round(self.connect_seconds, 3)}
        return out

    def map_shards(self, fn, jobs, names, progress=None):
        """``fn(job)`` as one Ray task per output shard ``names[k]`` (``run_tasks``)."""
        self._connect()
        return self.run_tasks(fn, [(job,) for job in jobs], names, progress)

    def info(self) -> dict:
        """What the last ``run_tasks`` ran (provenance)."""
        return dict(getattr(self, "last_info", None) or {"name": "ray", "workers": self.workers})


def _failure(name, exc, retries) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, SurgeonError):
        return f"shard {name}: {cause}; nothing was written"
    why = str(cause or exc).strip().splitlines()
    why = why[0] if why else type(exc).__name__
    return (f"shard {name}: its Ray task failed ({type(exc).__name__}: {why[:200]}) after "
            f"{retries} retries; nothing was written")


def partition(reader, groups) -> list:
    """For each shard, the groups (in plan order) that write into it; a group whose target
    and slots live in several shards goes to each (a task ignores the others' keys).
    The first shard also gets the groups nobody else has (their extras go there)."""
    parts = [[] for _ in reader.shard_names]
    mirrors = getattr(reader, "mirrors", {})
    for target, steps in groups:
        names = {target} | {n for s in steps for n, p in s.slots if p != "keep"}
        files = set()
        for n in names:
            key = reader.entry(n).key
            for k in (key, *mirrors.get(key, ())):
                files.add(reader._root[k].file_index)
        for f in sorted(files):
            parts[f].append((target, steps, 0 in files))
    return parts


def _absolute(recipe):
    import dataclasses
    absp = lambda p: None if p is None else os.path.abspath(p)  # noqa: E731
    return dataclasses.replace(recipe, input=absp(recipe.input), model=absp(recipe.model))


@contextlib.contextmanager
def task_frame(recipe, cwd, index, open_writer, **fields):
    """A Ray task's frame: in the driver's directory, the input opened and planned,
    ``open_writer(reader)``'s writer aborted if the body fails; yields ``(ctx, writer,
    out)``, ``out`` the task's result (shard, host, pid, counts, ``fields``, then seconds)."""
    from .plan import PlanContext, model_json_for, open_input
    t0 = time.perf_counter()
    os.chdir(cwd)  # sources named relative to the driver's directory (shared paths)
    out = {"shard": index, "host": socket.gethostname(), "pid": os.getpid(), "tensors": 0,
           "slots": 0, "bytes": 0, **fields}
    with open_input(recipe) as reader:
        ctx = PlanContext(recipe, reader, model_json_for(recipe))
        writer = open_writer(reader)
        try:
            yield ctx, writer, out
        except BaseException:
            writer.abort()
            raise
        finally:
            ctx.close()
    out["seconds"] = time.perf_counter() - t0


def shard_task(recipe, cwd, index, path, groups, iteration, pause=0.0) -> dict:
    """A Ray task: write shard ``index`` of ``recipe``'s output at ``path``."""
    from surgeon.formats.keras_sharded import OneShardWriter
    from .execute import _SlotState, write_iteration
    from .executors import compute
    with task_frame(recipe, cwd, index, lambda r: OneShardWriter(r, index, path),
                    extras=[]) as (ctx, writer, out):
        reader = ctx.reader
        mine = lambda n: reader._root[reader.entry(n).key].file_index == index  # noqa: E731
        for i, (target, steps, with_first) in enumerate(groups):
            value, changed, extras = compute(ctx, target, steps, _SlotState)
            for p, arr in extras:
                writer.add_extra(p, arr)
            if index != 0 and not with_first:
                out["extras"] += extras  # the driver stores them in the first shard
            for name, arr in [(target, value), *changed.items()]:
                writer.write(name, arr)
                if mine(name):
                    out["tensors" if name == target else "slots"] += 1
                    out["bytes"] += arr.nbytes
            if i == 0 and pause:
                time.sleep(pause)
        if iteration:
            write_iteration(iteration, reader, writer)
        writer.close()
    return out


def _finish_first_shard(path, extras, history):
    """Store the extras computed by other shards' tasks and the surgery log in shard 0."""
    import h5py
    import numpy as np

    from surgeon.formats import provenance
    if extras:
        with h5py.File(path, "r+") as f:
            for p, arr in extras:
                if p in f:
                    del f[p]
                f.create_dataset(p, data=np.asarray(arr))
    provenance.embed_file(path, "keras-weights-h5", history)
