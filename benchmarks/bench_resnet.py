#!/usr/bin/env python
"""Benchmark (issue 14, goal 4): a real many-tensor model, ResNet50.

``keras.applications.ResNet50(weights=None)`` trained one step with Adam and saved
(~284 MB ``.keras``, 320 weights + their Adam slots). In fresh children (wall, peak RSS;
best of --reps after a warm-up):

  cp + sync             the copy reference (surgeon fsyncs its output)
  rescale all           surgeon apply: every param rescaled, slots follow (new file)
  head edit             surgeon apply: rescale the head (predictions), slots follow
  rescale vectors       surgeon apply: every bias/gamma/beta/moving statistic (266 tensors,
                        their 320 slots follow; 1.2 MB): per-tensor cost without the bytes
  head edit --in-place  the same, in place in a copy
  keras route           load_model, set_weights on the head, save (once)

    python benchmarks/bench_resnet.py [--reps 2] [--workdir DIR]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tower import PY, mb, measure  # noqa: E402

MAKE = textwrap.dedent("""\
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    keras.utils.set_random_seed(0)
    m = keras.applications.ResNet50(weights=None)
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    m.fit(np.zeros((2, 224, 224, 3), "float32"), np.zeros((2,), "int32"), epochs=1, verbose=0)
    m.save(sys.argv[1])
    """)
KERAS_ROUTE = textwrap.dedent("""\
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras
    m = keras.saving.load_model(sys.argv[1])
    lay = m.get_layer("predictions")
    lay.set_weights([w * 0.5 for w in lay.get_weights()])
    m.save(sys.argv[2])
    """)
ALL = '[[ops]]\nop = "rescale"\nselect = { pattern = "*", role = "param" }\nfactor = 0.5\nslots = "follow"\n'
HEAD = '[[ops]]\nop = "rescale"\nselect = "predictions/*"\nfactor = 0.5\nslots = "follow"\n'
VECTORS = "".join(f'[[ops]]\nop = "rescale"\nselect = "*/{leaf}"\nfactor = 0.5\nslots = "{slots}"\n'
                  for leaf, slots in (("bias", "follow"), ("gamma", "follow"), ("beta", "follow"),
                                      ("moving_mean", "keep"), ("moving_variance", "keep")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_resnet_"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "resnet50_adam.keras"
    if not src.exists():
        subprocess.run([PY, "-c", MAKE, src], check=True, stderr=subprocess.DEVNULL)
    (work / "all.toml").write_text(ALL)
    (work / "head.toml").write_text(HEAD)
    (work / "vectors.toml").write_text(VECTORS)
    inplace, out = work / "inplace.keras", work / "out.keras"
    shutil.copyfile(src, inplace)
    s = [PY, "-m", "surgeon", "apply"]
    routes = {
        "cp + sync": ["sh", "-c", f'cp "{src}" "{out}" && sync "{out}"'],
        "rescale all": s + [work / "all.toml", "-i", src, "-o", out, "--no-progress"],
        "head edit": s + [work / "head.toml", "-i", src, "-o", out, "--no-progress"],
        "rescale vectors": s + [work / "vectors.toml", "-i", src, "-o", out, "--no-progress"],
        "head edit --in-place": s + [work / "head.toml", "-i", inplace, "--in-place", "--no-progress"],
        "keras route": [PY, "-c", KERAS_ROUTE, src, work / "keras.keras"],
    }
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = {}
    for name, cmd in routes.items():
        reps = 1 if name == "keras route" else args.reps + 1
        runs = []
        for _ in range(reps):
            out.unlink(missing_ok=True)
            secs, rss, rc, _ = measure(cmd, env=env)
            if rc != 0:
                raise SystemExit(f"failed ({rc}): {' '.join(map(str, cmd))}")
            runs.append((secs, rss))
        res[name] = min(runs[1:] or runs)
    out.unlink(missing_ok=True)
    import json
    n = len(json.loads(subprocess.run([PY, "-m", "surgeon", "ls", src, "--json"], capture_output=True,
                                      text=True, env=env).stdout)["entries"])
    print(f"bench_resnet: {src.name} {mb(src.stat().st_size)}, {n} tensors; best of {args.reps} "
          f"after a warm-up (keras route: one run); load average {os.getloadavg()[0]:.1f}")
    print("| route | wall s | peak RSS | / (cp + sync) |\n|---|---:|---:|---:|")
    cp = res["cp + sync"][0]
    for name, (secs, rss) in res.items():
        print(f"| {name} | {secs:.2f} | {mb(rss)} | {secs / cp:.2f}x |")
    full, head, k = res["rescale all"][0], res["head edit"][0], res["keras route"][0]
    per = (full - head) / max(n, 1) * 1000
    print(f"GOAL 4 | [ResNet50] every tensor + slots rescaled / cp + sync | {full / cp:.1f}x | <= 3x "
          f"| {'met' if full / cp <= 3 else 'missed'}")
    print(f"GOAL 4 | [ResNet50] per-tensor overhead ((all - head edit) / tensors) | {per:.2f} ms "
          f"| <= 0.5 ms | {'met' if per <= 0.5 else 'missed'}")
    fixed = (res["rescale vectors"][0] - head) / (266 + 320) * 1000
    print(f"GOAL 4 | [ResNet50] per-tensor fixed cost ((vectors - head edit) / 586 writes, 1.2 MB) "
          f"| {fixed:.2f} ms | <= 0.5 ms | {'met' if fixed <= 0.5 else 'missed'}")
    print(f"GOAL 4 | [ResNet50] keras route / one-layer edit (new file) | {k / head:.1f}x | >= 15x "
          f"| {'met' if k / head >= 15 else 'missed'}")
    print(f"GOAL 2 | [ResNet50] keras route / one-layer edit --in-place | "
          f"{k / res['head edit --in-place'][0]:.1f}x | >= 50x "
          f"| {'met' if k / res['head edit --in-place'][0] >= 50 else 'missed'}")
    for p in (inplace, work / "keras.keras"):
        p.unlink(missing_ok=True)
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
