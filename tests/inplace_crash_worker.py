"""Crash trials for ``--in-place`` (run by tests/test_inplace.py; never imports TensorFlow).

    python tests/inplace_crash_worker.py WORKDIR SEED CASE... (CASE = file:recipe:model:trials)

For each case: imports surgeon once, then forks a child per trial that edits a fresh copy
of ``file`` in place with ``recipe`` and is SIGKILLed at a random point -- either at a
random step of the journal protocol (``SURGEON_TEST_CRASH_AT``, sometimes half-way
through a write) or after a random delay. After each kill the parent opens the file the
way every surgeon command does (``surgeon.formats.detect``: rollback) and compares its
bytes with the old version and with the new one (from an uninterrupted run; the log's
clock is frozen so that the new version is reproducible). Prints one JSON line per case:
``{"old": n, "new": n, "mixed": [...], "said": n, ...}``.
"""
import datetime
import io
import json
import os
import random
import shutil
import signal
import sys
import time
import types
from contextlib import redirect_stderr
from pathlib import Path

from surgeon.core import journal
from surgeon.formats import detect, provenance
from surgeon.recipe import apply_overrides, load_recipe
from surgeon.recipe.in_place import apply_in_place


class _FixedClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


provenance.datetime = types.SimpleNamespace(datetime=_FixedClock, timezone=datetime.timezone)


def edit(path, recipe, model):
    rec = apply_overrides(load_recipe(recipe), input=str(path), output=None, sets=(),
                          model=model or None)
    apply_in_place(rec, hash_inputs=False)


def child(path, recipe, model, crash_at):
    """Fork a child editing ``path``; its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            if crash_at is not None:
                os.environ["SURGEON_TEST_CRASH_AT"] = crash_at
            else:
                os.environ["SURGEON_TEST_CRASH_AT"] = "1000000"  # count the steps
            edit(path, recipe, model)
            os._exit(min(journal._steps, 250))
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(255)
    return pid


def reset(path, old):
    journal.journal_path(path).unlink(missing_ok=True)
    path.write_bytes(old)


def run_case(work, rng, src, recipe, model, trials):
    path = work / Path(src).name
    old = Path(src).read_bytes()
    reset(path, old)
    edit(path, recipe, model)  # warm up: each child then starts with everything imported
    reset(path, old)
    start = time.perf_counter()
    _, status = os.waitpid(child(path, recipe, model, None), 0)
    duration = time.perf_counter() - start
    steps = os.waitstatus_to_exitcode(status)
    assert 0 < steps < 250, f"reference run failed ({steps})"
    new = path.read_bytes()
    assert new != old
    out = {"file": path.name, "steps": steps, "trials": trials, "old": 0, "new": 0,
           "mixed": [], "said": 0}
    for t in range(trials):
        reset(path, old)
        if t % 2 == 0:  # a chosen step of the journal protocol, maybe half-way through a write
            how = f"{rng.randrange(steps)}{rng.choice(['', ':half'])}"
            pid = child(path, recipe, model, how)
        else:  # a random moment of the whole run
            how = f"after {rng.uniform(0, duration):.4f}s"
            pid = child(path, recipe, model, "1000000")
            time.sleep(float(how.split()[1][:-1]))
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        err = io.StringIO()
        with redirect_stderr(err):
            detect(path)
        out["said"] += "rolled back" in err.getvalue() or "incomplete journal" in err.getvalue()
        after = path.read_bytes()
        if after == old:
            out["old"] += 1
        elif after == new:
            out["new"] += 1
        else:
            out["mixed"].append(how)
        assert not journal.journal_path(path).exists()
    return out


def main():
    work, seed = Path(sys.argv[1]), int(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for case in sys.argv[3:]:
        src, recipe, model, trials = case.split("::")
        work_case = work / Path(src).stem
        work_case.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run_case(work_case, rng, src, recipe, model, int(trials))), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
