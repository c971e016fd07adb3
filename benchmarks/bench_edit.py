#!/usr/bin/env python
"""Benchmark (issue 14, goal 1): a one-tensor edit into a new file against `cp` + `sync`.

On the Dense tower of benchmarks/_tower.py (~1.15 GB `.keras` with Adam state by
default), each round runs, interleaved, each in a fresh child process (wall time and
peak RSS via wait4; page cache warm after the first round, which is not counted):

  cp + sync               cp IN OUT && sync OUT  (surgeon fsyncs before its atomic rename)
  apply                   surgeon apply: rescale one 16 MB layer (slots follow), input hashed
  apply --no-hash-inputs  the same without the input content hash
  transplant              surgeon transplant of the last layer from a twin file (two
                          inputs hashed)
  apply --in-place        the same rescale, in place in a copy of the tower (issue 14,
                          goal 2: only the changed bytes written, through the journal)
  transplant --in-place   the same transplant, in place
  keras route             (--keras-rounds times, not paired) load_model, set_weights on one
                          layer, save: what the in-place edit is compared with

and prints the medians (wall and CPU seconds), the ratios to `cp` + `sync` (median of the per-round ratios:
paired, so that a busy moment hits both), the goals and the load average, and one
``GOAL`` line per goal ratio (collected by run_all.sh).

    python benchmarks/bench_edit.py                      # 1152 MB, 5 rounds
    python benchmarks/bench_edit.py --size-mb 256 --rounds 3
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tower import LAYER_BYTES, PY, mb, tower  # noqa: E402

GOAL = 1.2
IN_PLACE_WALL = 0.8


def routes(stem: Path, work: Path, layer: str, last: str):
    surgeon = [PY, "-m", "surgeon"]
    src, twin = stem.with_suffix(".keras"), work / f"{stem.name}_twin.keras"
    recipe = work / "edit_one.py"
    recipe.write_text(textwrap.dedent(f"""\
        from surgeon.recipe import recipe, rescale
        RECIPE = recipe(ops=[rescale("{layer}/*", factor=0.5, slots="follow")])
        """))
    for copy in (twin, work / f"{stem.name}_inplace.keras"):
        if not copy.exists() or copy.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, f"{copy}.part")  # renamed when whole: a killed run leaves no stub
            os.replace(f"{copy}.part", copy)
    out = work / "out.keras"
    inplace = work / f"{stem.name}_inplace.keras"
    return out, {
        "cp + sync": ["sh", "-c", f'cp "{src}" "{out}" && sync "{out}"'],
        "apply": surgeon + ["apply", recipe, "-i", src, "-o", out, "--no-progress"],
        "apply --no-hash-inputs": surgeon + ["apply", recipe, "-i", src, "-o", out,
                                             "--no-progress", "--no-hash-inputs"],
        "transplant": surgeon + ["transplant", twin, src, "-o", out, "--layers", last],
        "apply --in-place": surgeon + ["apply", recipe, "-i", inplace, "--in-place", "--no-progress"],
        "transplant --in-place": surgeon + ["transplant", twin, inplace, "--layers", last,
                                            "--in-place"],
    }


def keras_route(stem: Path, work: Path, layer: str):
    """The Keras route for the same one-layer edit (load, set_weights, save)."""
    from bench_apply import KERAS_ROUTE
    src = stem.with_suffix(".keras")
    return [PY, "-c", KERAS_ROUTE, src, work / "keras_route.keras", layer, "0", src]


def with_baseline(cmds: dict, baseline: str) -> dict:
    """Add each surgeon route run from the source tree ``baseline`` (e.g. the code before
    a change, from `git archive`), named ``<route> [baseline]``."""
    out = {}
    for name, cmd in cmds.items():
        out[name] = cmd
        if name != "cp + sync":
            out[f"{name} [baseline]"] = ("PYTHONPATH", baseline, cmd)
    return out


def measure(cmd, env, cwd=None):
    """(wall s, peak RSS bytes, CPU s (user + system), returncode) of ``cmd`` in a fresh child."""
    import subprocess
    import time
    t = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    return (time.perf_counter() - t, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime,
            os.waitstatus_to_exitcode(status))


ROOT = Path(__file__).resolve().parent.parent  # the source tree benchmarked


def child_env(work: Path) -> dict:
    """The children's environment: this source tree first on PYTHONPATH (the children run
    in ``work``, so that ``python -m surgeon`` does not pick up the current directory's
    copy: a ``--baseline`` tree replaces it), compiled bytecode cached under ``work`` (as
    an installed package has it; with PYTHONDONTWRITEBYTECODE set, every run would compile
    surgeon's modules from source again, ~0.15 s of CPU that no installed copy pays)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPYCACHEPREFIX=str(work / "pycache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_round(out: Path, cmds: dict) -> dict:
    res = {}
    for name, cmd in cmds.items():
        out.unlink(missing_ok=True)
        env = child_env(out.parent)
        if isinstance(cmd, tuple):
            var, value, cmd = cmd
            env[var] = value
        secs, rss, cpu, rc = measure(cmd, env=env, cwd=out.parent)
        if rc != 0:
            raise SystemExit(f"{name} failed ({rc}): {' '.join(map(str, cmd))}")
        res[name] = (secs, rss, cpu)
    out.unlink(missing_ok=True)
    return res


def print_goals(cmds, rounds, keras_runs, size):
    """One ``GOAL n | what | measured | target | verdict`` line per goal ratio."""
    def med(name, i=0):
        return statistics.median(r[name][i] for r in rounds)

    def pair(name):
        return statistics.median(r[name][0] / r["cp + sync"][0] for r in rounds)

    def line(goal, what, value, target, ok):
        print(f"GOAL {goal} | {what} | {value} | {target} | {'met' if ok else 'missed'}")
    for name in ("apply", "transplant"):
        if name in cmds:
            line(1, f"{name}: one-tensor edit into a new file / cp + sync ({mb(size)})",
                 f"{pair(name):.2f}x", f"<= {GOAL}x", pair(name) <= GOAL)
    for name in ("apply --in-place", "transplant --in-place"):
        if name in cmds:
            line(2, f"{name}: one 16 MB layer of {mb(size)}, wall incl. start-up",
                 f"{med(name):.2f} s", f"<= {IN_PLACE_WALL} s", med(name) <= IN_PLACE_WALL)
    if keras_runs and "apply --in-place" in cmds:
        k = statistics.median(r[0] for r in keras_runs)
        ratio = k / med("apply --in-place")
        line(2, "keras route / apply --in-place (same one-layer edit)", f"{ratio:.1f}x",
             ">= 50x", ratio >= 50)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1152, help="tower size (default 1152)")
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    ap.add_argument("--workdir", default=None, help="where the towers live (default: temp)")
    ap.add_argument("--keras-rounds", type=int, default=1,
                    help="runs of the Keras route (default 1; 0: skip it)")
    ap.add_argument("--baseline", default=None,
                    help="also run each surgeon route from this source tree (PYTHONPATH)")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="surgeon-bench-edit-"))
    work.mkdir(parents=True, exist_ok=True)
    stem = tower(work, args.size_mb)
    layers = max(1, round(args.size_mb * 2**20 / LAYER_BYTES))
    out, cmds = routes(stem, work, f"dense_{layers // 2}", f"dense_{layers - 1}")
    if args.baseline:
        cmds = with_baseline(cmds, args.baseline)
    size = stem.with_suffix(".keras").stat().st_size
    load0 = os.getloadavg()
    run_round(out, cmds)  # warm the page cache; not counted
    rounds = [run_round(out, cmds) for _ in range(args.rounds)]
    keras_runs = [measure(keras_route(stem, work, f"dense_{layers // 2}"), dict(os.environ))
                  for _ in range(args.keras_rounds)]
    (work / "keras_route.keras").unlink(missing_ok=True)
    load1 = os.getloadavg()
    print(f"one-tensor edit of {stem.name}.keras ({mb(size)}), {args.rounds} paired rounds, "
          f"{os.cpu_count()} cores; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end")
    print()
    print("| route | median s | min s | CPU s (user+sys, median) | peak RSS "
          "| ratio to cp + sync (median of pairs) | goal |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in cmds:
        secs = [r[name][0] for r in rounds]
        ratios = [r[name][0] / r["cp + sync"][0] for r in rounds]
        rss = max(r[name][1] for r in rounds)
        ratio = statistics.median(ratios)
        goal = "" if name == "cp + sync" or "no-hash" in name or "baseline" in name \
            or "in-place" in name else ("met" if ratio <= GOAL else "missed") + f" (<= {GOAL}x)"
        if "in-place" in name:
            wall = statistics.median(secs)
            goal = ("met" if wall <= IN_PLACE_WALL else "missed") + f" (<= {IN_PLACE_WALL} s)"
        cpu = statistics.median(r[name][2] for r in rounds)
        print(f"| {name} | {statistics.median(secs):.2f} | {min(secs):.2f} | {cpu:.2f} | {mb(rss)} | "
              f"{ratio:.2f}x | {goal} |")
    if keras_runs:
        k = statistics.median(r[0] for r in keras_runs)
        print(f"| keras route (load, set_weights, save; {len(keras_runs)} run) | {k:.2f} | "
              f"{min(r[0] for r in keras_runs):.2f} | {statistics.median(r[2] for r in keras_runs):.2f} | "
              f"{mb(max(r[1] for r in keras_runs))} | {k / statistics.median(r['cp + sync'][0] for r in rounds):.2f}x | |")
    print()
    print_goals(cmds, rounds, keras_runs, size)
    print()
    print("per-round ratios: " + "; ".join(
        f"{name}: " + " ".join(f"{r[name][0] / r['cp + sync'][0]:.2f}" for r in rounds)
        for name in cmds if name != "cp + sync"))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
