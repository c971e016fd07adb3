"""``convert`` to a sharded target (``.weights.json``) with ``--executor pool|ray``: one task
per output shard.

The skeleton (written by Keras, sharded with ``max_shard_size``) and a temporary directory
for the shards are beside the target, so every worker reads the same paths (a shared
filesystem, as for ``apply --executor ray``). Each task opens the source and the
skeleton, writes the tensors of its shard in the order the local writer would (the
report's pairs), copies the rest of its shard and returns. When every task succeeded, the
driver embeds the surgery log in the first shard, renames the shards into place and writes
the index last: nothing appears at the target otherwise. The executor (``map_shards``)
is any of ``surgeon.recipe.executors``'; this module does not import it.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from surgeon.core.errors import SurgeonError

GB = 1024 ** 3
DEFAULT_SHARD_GB = 5.0  # Keras' own default for a sharded store


def max_shard_gb(src_path, given=None) -> float:
    """The shard size of a sharded target: ``given`` (GB, as Keras' ``max_shard_size``), else
    the tensor bytes of the source's largest shard when it is sharded (about its shards),
    else Keras' default (5 GB)."""
    if given is not None:
        if not given > 0:
            raise SurgeonError(f"--max-shard-size must be > 0 (GB), got {given}")
        return float(given)
    from surgeon.formats import detect
    if detect(src_path) == "keras-weights-sharded":
        import json
        index = json.loads(Path(src_path).read_text())
        files = {f for v in index.get("weight_map", {}).values() for f in (v if isinstance(v, list) else [v])}
        sizes = [_tensor_bytes(Path(src_path).with_name(f)) for f in sorted(files)]
        if sizes and max(sizes) > 0:
            return max(sizes) / GB
    return DEFAULT_SHARD_GB


def _tensor_bytes(path) -> int:
    """Bytes of the tensors Keras stored in one shard (as Keras counts them)."""
    import h5py
    total = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: total.append(o.size * o.dtype.itemsize)
                     if isinstance(o, h5py.Dataset) and not n.startswith("surgeon/") else None)
    return sum(total)


def check_executor(executor, fmt, dst):
    """A distributed executor writes sharded targets only (one task per shard)."""
    name = getattr(executor, "name", "local")
    if name != "local" and fmt != "keras-weights-sharded":
        raise SurgeonError(f"{dst}: convert --executor {name} writes one task per output shard, "
                           f"and a {fmt} target is one file; convert to a sharded target "
                           "(OUT.weights.json, --max-shard-size GB) or use --executor local")


def local_info() -> dict:
    """The log's ``executor`` record of a conversion written by this process."""
    return {"name": "local", "workers": 1, "tasks": 1, "hosts": [socket.gethostname()]}


def partition(skel, pairs) -> list:
    """For each shard of the skeleton, ``[(target, source)]`` it writes (report order)."""
    parts = [[] for _ in skel.shard_names]
    mirrors = getattr(skel, "mirrors", {})
    for p in pairs:
        if p.source is None:
            continue
        key = skel.entry(p.target).key
        for f in sorted({skel._root[k].file_index for k in (key, *mirrors.get(key, ()))}):
            parts[f].append((p.target, p.source))
    return parts


def value(src, skel, target, source):
    """``source``'s array as ``target`` stores it (shape and dtype of the skeleton)."""
    import numpy as np
    t = skel.entry(target)
    arr = src.read(source)
    if tuple(arr.shape) != t.shape:
        arr = np.asarray(arr).reshape(t.shape) if np.asarray(arr).size == t.size else arr
    arr = np.asarray(arr)
    if str(arr.dtype) != t.dtype and t.dtype != "bfloat16":
        arr = arr.astype(t.dtype)
    return arr


def open_source(path, namer, model):
    """The source reader as ``convert`` opens it (``model``'s config when it has none)."""
    from surgeon.formats import open_checkpoint
    src = open_checkpoint(path, model=namer)
    if model is not None and not getattr(src, "model_json", None):
        from surgeon.formats.keras_h5 import read_model_json
        src.model_json = read_model_json(model)
    return src


def shard_task(job) -> dict:
    """Write shard ``job["index"]`` of the target at ``job["path"]`` (a worker's task)."""
    import numpy as np

    from surgeon.formats import open_checkpoint
    from surgeon.formats.keras_sharded import OneShardWriter
    t0 = time.perf_counter()
    os.chdir(job["cwd"])  # paths as the driver named them (shared filesystem)
    out = {"shard": job["index"], "host": socket.gethostname(), "pid": os.getpid(),
           "tensors": 0, "iterations": None}
    with open_source(job["src"], job["namer"], job["model"]) as src, \
            open_checkpoint(job["skel"], model=job["skel_model"]) as skel:
        writer = OneShardWriter(skel, job["index"], job["path"])
        try:
            for target, source in job["pairs"]:
                arr = value(src, skel, target, source)
                writer.write(target, arr)
                out["tensors"] += 1
                if target == "optimizer/iteration":
                    out["iterations"] = int(np.asarray(arr).reshape(-1)[0])
                if job.get("pause") and out["tensors"] == 1:
                    time.sleep(job["pause"])
            writer.close()
        except BaseException:
            writer.abort()
            raise
    out["seconds"] = time.perf_counter() - t0
    return out


def fill_sharded(executor, skel, dst, report, job_args, history):
    """Write ``report``'s pairs into the sharded target ``dst`` through ``executor``, one
    task per shard; ``history(executor_info)``: the surgery log for the first shard."""
    from surgeon.core import atomic
    from surgeon.formats import provenance
    from surgeon.formats.keras_sharded import publish_shards, shard_names
    dst = Path(dst).absolute()
    rename = shard_names(skel, dst)
    names = [rename[n] for n in skel.shard_names]
    parts = partition(skel, report.pairs)
    tmpdir = atomic.temp_dir(dst)
    try:
        jobs = [dict(job_args, index=k, path=str(tmpdir / names[k]), pairs=parts[k], cwd=os.getcwd())
                for k in range(len(names))]
        results = executor.map_shards(shard_task, jobs, names)
        its = [r["iterations"] for r in results if r["iterations"] is not None]
        report.iterations = its[0] if its else report.iterations
        info = executor.info() | {"tasks": len(results), "hosts": sorted({r["host"] for r in results})}
        provenance.embed_file(tmpdir / names[0], "keras-weights-h5", history(info))
        publish_shards(skel, rename, tmpdir, dst)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return len(results)
