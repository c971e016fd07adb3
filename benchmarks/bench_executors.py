#!/usr/bin/env python
"""Benchmark: every tensor and its slots rewritten, by executor (issue 14 goal 4, issue 18).

The recipe rescales EVERY param by 0.5 with its Adam slots following (every param and
slot read, transformed, written). Each route runs in a fresh child; wall time is
measured around it, and peak memory is the largest sum of the PSS of the child and all
its descendants (pool workers, Ray's daemons and workers), sampled every 20 ms. In one
run, on the same files:

  tower .keras (--tower-mb)      cp + sync | apply local | apply pool
  ResNet50 .keras (Adam, 1 step) cp + sync | apply local | apply pool
  sharded tower .weights.json    cp + sync | apply local | apply pool | apply ray
    (--sharded-mb in --shard-mb shards; Ray: a local cluster started by the command)
  merge of two sharded towers    cp + sync | merge local | merge pool | merge ray
    (the tower and its rescaled copy, linear 0.5/0.5: every param read twice, written
    with zero slots; the same shards, the same executors)

and prints the ratios to cp + sync, the time per written tensor (the engine's own
seconds / tensors + slots written), the peak memory against workers x largest tensor +
150 MB, and Ray's start-up and per-task overhead against the pool.

    python benchmarks/bench_executors.py                                # 1 GB, ResNet50, 2 GB sharded
    python benchmarks/bench_executors.py --tower-mb 256 --sharded-mb 512 --workdir /tmp/b
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tower import PY, mb, model_code, tower  # noqa: E402

RECIPE = 'from surgeon.recipe import recipe, rescale\nRECIPE = recipe(ops=[rescale("*", factor=0.5, slots="follow")])\n'
RESNET = textwrap.dedent("""\
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    keras.utils.set_random_seed(0)
    m = keras.applications.ResNet50(weights=None)
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    m.fit(np.random.rand(2, 224, 224, 3).astype("float32"), np.array([1, 2]), epochs=1, verbose=0)
    m.save(sys.argv[1])
    """)


def _tree(pid):
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _pss(pid):
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd):
    """(seconds, peak PSS of the process tree, stdout) of ``cmd`` in a fresh child."""
    t = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], sum(_pss(p) for p in _tree(proc.pid)))
            time.sleep(0.02)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    secs = time.perf_counter() - t
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{err.decode()[-2000:]}")
    return secs, peak[0], out.decode()


def sharded_tower(work, size_mb, shard_mb):
    """A tower saved as Keras sharded weights + its config.json (for --model)."""
    d = work / f"sharded_{size_mb}mb_{shard_mb}"
    if (d / "w.weights.json").exists():
        return d / "w.weights.json", d / "config.json"
    d.mkdir(parents=True, exist_ok=True)
    code = model_code(size_mb, '"mse"') + textwrap.dedent(f"""\
        import json
        model.optimizer.build(model.trainable_variables)
        model.optimizer.iterations.assign(1000)
        model.save_weights(r"{d / 'w.weights.json'}", max_shard_size={shard_mb / 1024})
        cfg = keras.saving.serialize_keras_object(model)
        cfg["compile_config"] = model.get_compile_config()
        open(r"{d / 'config.json'}", "w").write(json.dumps(cfg))
        """)
    subprocess.run([PY, "-c", code], check=True, stderr=subprocess.DEVNULL)
    return d / "w.weights.json", d / "config.json"


def files_of(path):
    path = Path(path)
    if path.name.endswith(".weights.json"):
        return [path] + sorted(path.parent.glob(path.name[: -len(".weights.json")] + "_*.weights.h5"))
    return [path]


def cp_sync(src, work):
    dst = work / "cp"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    files = " ".join(f'"{f}"' for f in files_of(src))
    secs, _, _ = measure(["sh", "-c", f'cp {files} "{dst}/" && sync "{dst}"/*'])
    shutil.rmtree(dst)
    return secs


def apply(src, work, executor, workers, model=None):
    name = "o.weights.json" if str(src).endswith(".weights.json") else "o.keras"
    out = work / f"out_{executor}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    cmd = [PY, "-m", "surgeon", "apply", work / "all.py", "-i", src, "-o", out / name, "--json",
           "--no-progress", "--executor", executor]
    if executor != "local":
        cmd += ["--workers", workers]
    if model:
        cmd += ["--model", model]
    secs, peak, stdout = measure(cmd)
    w = json.loads(stdout)["written"]
    from surgeon.formats.provenance import read_log
    info = read_log(out / name)[-1].get("executor", {})
    shutil.rmtree(out)
    return {"wall": secs, "peak": peak, "run": w["seconds"], "writes": w["tensors"] + w["slots"],
            "task_seconds": info.get("task_seconds"), "connect": info.get("connect_seconds", 0)}


def merge(src, work, executor, workers, model=None):
    """``surgeon merge`` of ``src`` and its rescaled copy (``ft``), as ``apply`` above."""
    other = work / "ft" / "ft.weights.json"
    if not other.exists():
        other.parent.mkdir(exist_ok=True)
        subprocess.run([PY, "-m", "surgeon", "apply", work / "all.py", "-i", src, "-o", other,
                        "--model", model, "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    out = work / f"merge_{executor}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    cmd = [PY, "-m", "surgeon", "merge", src, other, "--weight", "0.5,0.5", "--model", model,
           "-o", out / "m.weights.json", "--json", "--no-hash-inputs", "--executor", executor]
    if executor != "local":
        cmd += ["--workers", workers]
    secs, peak, stdout = measure(cmd)
    w = json.loads(stdout)["written"]
    from surgeon.formats.provenance import read_log
    info = read_log(out / "m.weights.json")[-1].get("executor", {})
    shutil.rmtree(out)
    return {"wall": secs, "peak": peak, "run": w["seconds"], "writes": w["tensors"] + w["slots"],
            "task_seconds": info.get("task_seconds"), "connect": info.get("connect_seconds", 0)}


def largest_tensor(src, model=None):
    """(largest tensor, largest tensor + its slots (what one task holds), tensor count)."""
    from surgeon.formats import open_checkpoint
    from surgeon.recipe.executors import _itemsize
    with open_checkpoint(src, model=model) as r:
        sizes, slots = {}, {}
        for e in r.entries():
            size = _itemsize(e.dtype)
            for d in e.shape:
                size *= int(d)
            sizes[e.name] = size
            if e.slot_of:
                slots[e.slot_of] = slots.get(e.slot_of, 0) + size
    group = max(sizes[n] + slots.get(n, 0) for n in sizes)
    return max(sizes.values()), group, len(sizes)


def bench(label, src, work, workers, executors, repeat, model=None, route=None):
    """Time ``route`` (``apply``, or ``merge``) on ``src`` by each executor."""
    route = route or apply
    size = sum(f.stat().st_size for f in files_of(src))
    big, group, n = largest_tensor(src, model)
    cp = min(cp_sync(src, work) for _ in range(repeat))
    print(f"\n{label}: {mb(size)} in {len(files_of(src))} file(s), {n} tensors, largest {mb(big)} "
          f"({mb(group)} with its slots)")
    print(f"  {'route':<14} {'wall s':>7} {'x cp+sync':>9} {'run s':>7} {'ms/tensor':>9} {'peak PSS':>10} "
          f"{'bound':>10} {'bound(group)':>12}")
    print(f"  {'cp + sync':<14} {cp:7.2f} {1:9.2f}")
    res = {}
    for ex in executors:
        runs = [route(src, work, ex, workers, model) for _ in range(repeat)]
        r = min(runs, key=lambda x: x["wall"]) | {"peak": max(x["peak"] for x in runs)}
        res[ex] = r
        k = 1 if ex == "local" else workers
        bound, gbound = k * big + 150 * 2**20, k * group + 150 * 2**20
        print(f"  {ex:<14} {r['wall']:7.2f} {r['wall'] / cp:9.2f} {r['run']:7.2f} "
              f"{1000 * r['run'] / max(1, r['writes']):9.2f} {mb(r['peak']):>10} {mb(bound):>10} "
              f"{mb(gbound):>12}{'' if r['peak'] <= gbound else '  (over)'}")
    if "ray" in res and "pool" in res:
        tasks = len(files_of(src)) - 1
        ray, pool = res["ray"], res["pool"]
        busy = sum(ray["task_seconds"] or [0])
        print(f"  ray: cluster start/connect {ray['connect']:.2f} s (in wall, not in run); in-run "
              f"{ray['run']:.2f} s vs pool {pool['run']:.2f} s over {tasks} tasks -> "
              f"{1000 * (ray['run'] - pool['run']) / tasks:+.0f} ms per task; the tasks' own "
              f"time {busy:.2f} s ({1000 * busy / tasks:.0f} ms each), scheduling/transfer "
              f"{1000 * (ray['run'] * min(workers, tasks) - busy) / tasks:.0f} ms per task")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tower-mb", type=int, default=1024)
    ap.add_argument("--sharded-mb", type=int, default=2048)
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=1, help="runs per route (fastest kept)")
    ap.add_argument("--skip", default="", help="comma list of: tower, resnet, sharded, merge, ray")
    ap.add_argument("--workdir", default=None, help="generated files are kept and reused there")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="surgeon-bench-exec-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "all.py").write_text(RECIPE)
    print(f"workers {args.workers}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start")
    try:
        if "tower" not in skip:
            bench("tower .keras", tower(work, args.tower_mb).with_suffix(".keras"), work, args.workers,
                  ("local", "pool"), args.repeat)
        if "resnet" not in skip:
            rn = work / "resnet50.keras"
            if not rn.exists():
                subprocess.run([PY, "-c", RESNET, rn], check=True, stderr=subprocess.DEVNULL)
            bench("ResNet50 .keras (Adam)", rn, work, args.workers, ("local", "pool"), args.repeat)
        if "sharded" not in skip:
            src, cfg = sharded_tower(work, args.sharded_mb, args.shard_mb)
            exs = ("local", "pool") + (() if "ray" in skip else ("ray",))
            bench(f"sharded tower .weights.json ({args.shard_mb} MB shards)", src, work, args.workers,
                  exs, args.repeat, model=cfg)
        if "merge" not in skip:
            src, cfg = sharded_tower(work, args.sharded_mb, args.shard_mb)
            exs = ("local", "pool") + (() if "ray" in skip else ("ray",))
            bench(f"merge: sharded tower + its rescaled copy ({args.shard_mb} MB shards)", src, work,
                  args.workers, exs, args.repeat, model=cfg, route=merge)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
