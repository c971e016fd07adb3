#!/usr/bin/env python
"""Planted bugs: does the test suite catch realistic mistakes?

Each bug below is an exact text replacement in one module of the package. For every bug,
the repository's ``surgeon/`` and ``tests/`` are copied into a scratch directory (the other
top-level entries are symlinked), the bug is planted in the copy (the script fails loudly
when the old text is not found exactly once: the bug list is out of date), and the bug's
tests run there in one ``pytest -x`` process with the copy first on the path. The script
exits non-zero unless every bug is caught, and prints which test caught each one.

Usage:
    python tools/plant_bugs.py                  # all bugs, 2 at a time
    python tools/plant_bugs.py --jobs 1 adam-slot-order follow-power
    python tools/plant_bugs.py --baseline       # first check the tests pass without bugs
    python tools/plant_bugs.py --list

A new invariant gets a planted bug here. When modules move, update ``FILES`` (one table).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("surgeon", "tests")  # everything else at the top level is symlinked

# short name -> module path in the repository (the only place to update when modules move)
FILES = {
    "optimizers": "surgeon/binding/optimizers.py",
    "layers": "surgeon/binding/layers.py",
    "keras_layout": "surgeon/formats/keras_layout.py",
    "formats": "surgeon/formats/__init__.py",
    "atomic": "surgeon/core/atomic.py",
    "restore": "surgeon/train/restore.py",
    "keras_zip": "surgeon/formats/keras_zip.py",
    "keras_patch": "surgeon/formats/keras_patch.py",
    "legacy_binding": "surgeon/binding/legacy.py",
    "op_base": "surgeon/ops/base.py",
    "op_initializers": "surgeon/ops/initializers.py",
    "op_transfer": "surgeon/ops/transfer.py",
    "execute": "surgeon/recipe/execute.py",
    "plan": "surgeon/recipe/plan.py",
    "convert": "surgeon/convert/__init__.py",
    "convert_skeleton": "surgeon/convert/skeleton.py",
    "keras_classes": "surgeon/formats/keras_classes.py",
    "tf_objgraph": "surgeon/formats/tf_objgraph.py",
    "diff": "surgeon/inspect/diff.py",
    "merge_methods": "surgeon/merging/methods.py",
    "op_merge": "surgeon/ops/merge.py",
    "lora": "surgeon/train/lora.py",
    "orbax": "surgeon/formats/orbax.py",
    "orbax_layout": "surgeon/formats/orbax_layout.py",
    "orbax_writer": "surgeon/formats/orbax_writer.py",
    "structure_kinds": "surgeon/structure/kinds.py",
    "structure_graph": "surgeon/structure/graph.py",
    "journal": "surgeon/core/journal.py",
    "inplace": "surgeon/formats/inplace.py",
    "executors": "surgeon/recipe/executors.py",
    "ray_shards": "surgeon/recipe/ray_shards.py",
}


@dataclass(frozen=True)
class Bug:
    name: str
    file: str  # key of FILES
    old: str
    new: str
    tests: tuple  # pytest node ids (relative to the repository)
    what: str


T_TREE = "tests/test_keras_tree.py"
T_SLOTS = "tests/test_slot_policies.py::test_slot_policy_against_keras"
T_SUB = "tests/test_subclassed.py"
# the same model saved by Keras as .keras (bound by layout) and legacy .h5 (bound by names)
T_LEGACY = "tests/test_legacy.py::test_keras3_legacy_writer_matches_keras3_tree"
BUGS = [
    Bug("journal-saves-new-bytes", "journal",
        "    for off, old, _ in spans:\n        parts.append", "    for off, _, old in spans:\n        parts.append",
        ("tests/test_inplace.py::test_sigkill_at_random_points_leaves_the_old_or_the_new_file",),
        "the in-place rollback journal saves the new bytes instead of the old ones"),
    Bug("inplace-crc-one-header", "inplace",
        "                i.CRC, i.compress_size, i.file_size = crc,",
        "                i.compress_size, i.file_size =",
        ("tests/test_inplace.py::test_keras_zip_crc_is_updated_in_both_headers",),
        "an in-place .keras edit updates the CRC in the local header only, not the central directory"),
    Bug("adam-slot-order", "optimizers", 'groups = [("momentum", "velocity")]',
        'groups = [("velocity", "momentum")]',
        (f"{T_LEGACY}[k3_cnn_adam]",),
        "Adam's momentum and velocity swapped in the storage layout"),
    Bug("rmsprop-group-order", "optimizers",
        'if _truthy(c, "momentum"):\n            groups.append(("momentum",))\n'
        '        if _truthy(c, "centered"):\n            groups.append(("average_gradient",))',
        'if _truthy(c, "centered"):\n            groups.append(("average_gradient",))\n'
        '        if _truthy(c, "momentum"):\n            groups.append(("momentum",))',
        (f"{T_LEGACY}[k3_cnn_rmsprop]",),
        "RMSprop(centered, momentum): average_gradient group before momentum"),
    Bug("amsgrad-interleaved", "optimizers", 'groups.append(("velocity_hat",))',
        'groups[0] = groups[0] + ("velocity_hat",)',
        (f"{T_LEGACY}[k3_lstm_adam]",),
        "Adam(amsgrad): velocity_hat interleaved with m/v instead of a group of its own"),
    Bug("bn-moving-stats-swapped", "layers", '"BatchNormalization": ("moving_mean", "moving_variance")',
        '"BatchNormalization": ("moving_variance", "moving_mean")',
        (f"{T_TREE}::test_values_read_lazily_equal_keras[cnn_adam]",),
        "BatchNorm moving_mean/moving_variance names swapped (same shapes)"),
    Bug("frozen-bound-as-trainable", "keras_layout",
        'frozen = role == "param" and (frozen or not obj.trainable)', "frozen = False",
        (f"{T_TREE}::test_frozen_layer_has_no_slots",),
        "a frozen layer's params treated as trainable"),
    Bug("output-is-input-guard-dropped", "atomic",
        "    if not known:\n        return\n", "    if True:\n        return\n",
        ("tests/test_no_data_loss.py::test_library_writer_refuses_an_open_input",),
        "the atomic write layer no longer refuses to write over an input"),
    Bug("normalization-not-finalized", "restore",
        "            layer.finalize_state()\n", "            pass\n",
        ("tests/test_modern_keras.py::test_resume_finalizes_adapted_normalization_like_keras",),
        "resume restores an adapted Normalization's mean/variance without finalizing it"),
    Bug("zip-crc-not-updated", "keras_zip", "crc = zlib.crc32(block, crc)", "zlib.crc32(block, crc)",
        ("tests/test_roundtrip.py::test_keras_roundtrip_lossless[cnn_adam]",),
        "the .keras writer forgets the CRC update of the weights member"),
    Bug("patch-crc-not-updated", "keras_patch", "self.crc ^= crc32_delta(diff, self.size - p - k)",
        "self.crc = self.crc",
        # the pool/local raw writes keep the CRC through absorb() (raw-write-crc-unshifted);
        # h5py's own writes into the member go through CrcTrackingFile.write
        ("tests/test_recipe_writers.py::test_crc_tracking_file_under_random_writes",),
        "the clone-and-patch .keras writer forgets the CRC update of a patched range"),
    Bug("input-patched-in-place", "keras_patch",
        "self._begin(lambda: (copy(), self._open(self._tmp)))",
        "self._begin(lambda: (copy(), self._open(reader.path)))",
        ("tests/test_oracles.py::test_successful_write_leaves_inputs_untouched[apply-weights-h5]",),
        "the .weights.h5 patch writer edits the input instead of its clone"),
    Bug("keras20-model-order", "legacy_binding", "NAME_ORDER: sorted(params, key=lambda p: p.wname)",
        "NAME_ORDER: list(params)",
        ("tests/test_legacy.py::test_keras20_values_against_raw_h5",),
        "Keras 2.0 optimizer weights bound in model order instead of sorted by variable name"),
    Bug("follow-power-1", "op_base", "return 2 if kind in SECOND_MOMENT else 1", "return 1",
        ("tests/test_ops.py::test_rescale[follow]",),
        "follow scales second moments by c instead of c**2"),
    Bug("warm-zeroes-second-moments", "execute",
        'if policy == "warm" and slot_power(kind) == 2:', 'if policy == "warm" and slot_power(kind) == 1:',
        ("tests/test_ops.py::test_zero[warm]",),
        "warm fills first moments with their mean and zeroes second moments"),
    Bug("reset-ignores-touched", "execute",
        "touched = np.ones(e.shape, bool) if res.touched is None else res.touched\n            fill = 0.0",
        "touched = np.ones(e.shape, bool)\n            fill = 0.0",
        ("tests/test_ops.py::test_clip_resets_only_clipped_elements",),
        "reset zeroes every slot element, not only the touched ones"),
    Bug("transplant-reads-target-name", "op_transfer", 'name = f"optimizer/{step.source}/{kind}"',
        'name = f"optimizer/{step.target}/{kind}"',
        ("tests/test_ops.py::test_transplant_slots_and_iteration",),
        "transplant looks the source's slots up under the target's name"),
    Bug("iteration-off-by-one", "plan", 'after = 0 if policy == "reset" else int(policy)',
        'after = 0 if policy == "reset" else int(policy) + 1',
        ("tests/test_ops.py::test_transplant_slots_and_iteration",),
        "iteration=N writes N + 1"),
    Bug("he-normal-fan-out", "op_initializers", '"he_normal": (2.0, "fan_in", "truncated_normal")',
        '"he_normal": (2.0, "fan_out", "truncated_normal")',
        ("tests/test_ops.py::test_initializer_statistics_match_keras",),
        "he_normal scaled by fan_out"),
    Bug("convert-positional", "convert", "s = by_name.get(t.name)", "s = None",
        ("tests/test_convert.py::test_like_reordered_layers_match_by_name",),
        "convert pairs weights by layer order instead of by name"),
    Bug("lambda-not-refused", "convert_skeleton", "name = find_lambda(config)", "name = None",
        ("tests/test_oracles.py::test_lambda_payload_never_runs[convert]",),
        "a Lambda layer's stored bytecode is no longer refused by convert"),
    Bug("add-weight-state-as-frozen", "keras_classes",
        '"frozen" if id(v) in created_trainable else "state")', '"frozen")',
        (f"{T_SUB}::test_names_roles_and_slots_match_keras[keras]",),
        "a non-trainable add_weight variable of a custom layer listed as a frozen param"),
    Bug("subclassed-tf-names-from-scope", "tf_objgraph",
        "        return _in_subclassed(g, chain, full)", "        return full",
        (f"{T_SUB}::test_names_roles_and_slots_match_keras[ckpt]",),
        "a subclassed model's TF checkpoint named by its TF name scopes (sub/kernel)"),
    Bug("tf-untrained-role-guessed-silently", "tf_objgraph", "    unsure.append(name)\n", "",
        (f"{T_SUB}::test_checkpoint_alone_names_like_keras_and_says_what_it_cannot_tell",),
        "a TF checkpoint's untrained variable of unknown kind listed as frozen without a note"),
    Bug("convert-tf-by-order", "convert",
        'by_order = getattr(src, "format", "") not in TF_FORMATS_WITHOUT_CONFIG', "by_order = True",
        ("tests/test_conformance.py::test_unsupported_cells_are_one_line_refusals",),
        "convert pairs a TF checkpoint's nested weights by layer order when names do not fit"),
    Bug("diff-naming-notes-dropped", "diff", "        result.notes = [", "        _ = [",
        ("tests/test_conformance.py::test_diff_says_why_names_differ",),
        "diff shows tensors added/removed without the readers' notes saying why names differ"),
    Bug("ties-no-sign-election", "merge_methods", "agree = (np.sign(t) == sign) & (t != 0)",
        "agree = t != 0", ("tests/test_merge_math.py::test_ties_by_hand",),
        "TIES averages every non-zero task vector instead of those agreeing with the elected sign"),
    Bug("dare-seed-ignores-tensor", "merge_methods", "zlib.crc32(key.encode())", "0",
        ("tests/test_merge_math.py::test_dare_seeded_rescaled_and_p0_is_task_arithmetic",),
        "DARE draws the same drop mask for every tensor of the same shape"),
    Bug("merge-shape-unchecked", "op_merge", "if tuple(x.shape) != tuple(e.shape):", "if False:",
        ("tests/test_merge_math.py::test_committed_fixtures_merge_exactly_and_shape_mismatch_is_refused",),
        "merge no longer checks every input's shapes at plan time"),
    Bug("lora-alpha-from-rank", "lora", "layer.lora_alpha = alphas.get(layer.name, layer.lora_alpha)",
        "layer.lora_alpha = layer.lora_alpha",
        ("tests/test_merge.py::test_lora_merge_gives_a_plain_model_with_the_same_outputs",),
        "lora merge of a TF checkpoint folds with alpha = rank (Keras' loader), not the stored alpha"),
    Bug("orbax-missing-process-data-accepted", "orbax_layout",
        "        if not (item / rel).is_file():", "        if False:",
        ("tests/test_orbax.py::test_damaged_checkpoint_one_line_exit_2",),
        "an Orbax checkpoint whose ocdbt.process_N data is missing opens (fails later, mid-read)"),
    Bug("orbax-keras-scalar-dtype-as-stored", "orbax", '_KERAS_SCALAR = {"float64": "float32"}',
        "_KERAS_SCALAR = {}",
        ("tests/test_orbax.py::test_diff_keras_file_and_orbax_step_equal",),
        "Keras' float32 optimizer scalars listed as the float64 Python floats Orbax stores"),
    Bug("orbax-scalars-not-copied", "orbax_writer",
        "                if leaf.key not in self._written:",
        '                if leaf.key not in self._written and leaf.value_type != "scalar":',
        ("tests/test_orbax.py::test_identity_apply_keras_loads_bit_identical_and_keeps_training",),
        "the Orbax writer drops untouched scalars (iteration, learning rate, metric counts)"),
    Bug("depthwise-slots-blockwise", "structure_kinds",
        "return [float(f) for f in factors for _ in range(mult)] * blocks",
        "return [float(f) for _ in range(mult) for f in factors] * blocks",
        ("tests/test_structure_kinds.py::test_depthwise_and_separable_follow_the_map_slots_alike",),
        "a depthwise conv's slot factors laid out block-wise, not per channel (multiplier > 1)"),
    Bug("nested-input-shape-stale", "structure_graph",
        '            layer.config["batch_shape"] = list(shape)\n', "",
        ("tests/test_structure_kinds.py::test_nested_models_followed_inside",),
        "a channel edit entering a nested model leaves its Input layer's shape stale"),
    # executors: every executor's output is the local one's; Ray leaves nothing on failure
    Bug("pool-drops-chunk", "executors",
        "window.append(submit(chunk))\n"
        "                    if len(window) >= self.workers:\n                        break",
        "if len(window) >= self.workers:\n                        break\n"
        "                    window.append(submit(chunk))",
        ("tests/test_executors.py::test_pool_identical_to_local_sharded",),
        "the process pool loses the chunk it takes when its window is full (tensors left unedited)"),
    Bug("raw-write-crc-unshifted", "keras_patch",
        "self._member.crc ^= _multmodp(_x2nmodp(after, 3), linear) if after else linear",
        "self._member.crc ^= linear",
        ("tests/test_executors.py::test_pool_identical_to_local_keras",),
        "a raw write's CRC change not shifted by the member bytes after it"),
    Bug("ray-partition-target-shard-only", "ray_shards", "for f in sorted(files):",
        "for f in sorted(files)[:1]:",
        ("tests/test_executors.py::test_ray_sharded_identical_to_local",),
        "a Ray task per shard, but slots stored in another shard than their param are never written"),
    Bug("ray-failure-leaves-temps", "ray_shards",
        "        finally:\n            shutil.rmtree(tmpdir, ignore_errors=True)",
        "        finally:\n            pass",
        ("tests/test_executors.py::test_ray_worker_killed_without_retry_leaves_nothing",),
        "a failed Ray run leaves its shards' temporary directory beside the target"),
]


def scratch_copy(bug: Bug | None) -> Path:
    """A scratch repository: surgeon/ and tests/ copied (bug planted), the rest symlinked."""
    d = Path(tempfile.mkdtemp(prefix=f"planted-{bug.name if bug else 'baseline'}-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for entry in ROOT.iterdir():
        if entry.name in COPIED:
            shutil.copytree(entry, d / entry.name, ignore=ignore)
        elif not entry.name.startswith("."):
            (d / entry.name).symlink_to(entry)
    if bug is not None:
        plant(d, bug)
    return d


def plant(root: Path, bug: Bug) -> None:
    path = root / FILES[bug.file]
    text = path.read_text()
    n = text.count(bug.old)
    if n != 1:
        raise SystemExit(f"plant_bugs: {bug.name}: the text to replace occurs {n} times in "
                         f"{FILES[bug.file]} (expected once); update BUGS: {bug.old!r}")
    path.write_text(text.replace(bug.old, bug.new))


def run_tests(root: Path, tests) -> tuple[int, list, str]:
    """(pytest exit code, failed/errored node ids, output tail) for ``tests`` in ``root``."""
    env = dict(os.environ, PYTHONPATH=str(root), TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTEST_ADDOPTS", None)
    # -o addopts=: in-process, without the suite's xdist worker (whose -x exits 2, not 1)
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-x", "-q", "-rfE", "-p",
           "no:cacheprovider", *tests]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    return r.returncode, failed, (r.stdout + r.stderr)[-3000:]


def check_isolation(root: Path) -> None:
    """The scratch copy, not the repository or an installed package, is what gets imported."""
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", "import surgeon; print(surgeon.__file__)"],
                         cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    if not Path(out.strip()).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"plant_bugs: the scratch copy is not imported ({out.strip()})")


def try_bug(bug: Bug) -> dict:
    root = scratch_copy(bug)
    t0 = time.monotonic()
    try:
        code, failed, tail = run_tests(root, bug.tests)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    caught = code == 1 and bool(failed)
    return {"bug": bug, "caught": caught, "by": failed, "code": code, "tail": tail,
            "seconds": time.monotonic() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bugs", nargs="*", help="names of bugs to plant (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--baseline", action="store_true", help="first run every bug's tests unmodified")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for b in BUGS:
            print(f"{b.name:32} {FILES[b.file]:34} {b.what}")
        return 0
    known = {b.name: b for b in BUGS}
    unknown = [n for n in args.bugs if n not in known]
    if unknown:
        raise SystemExit(f"plant_bugs: unknown bug(s) {', '.join(unknown)}; see --list")
    bugs = [known[n] for n in args.bugs] if args.bugs else BUGS
    for b in bugs:  # every patch must apply before anything runs
        text = (ROOT / FILES[b.file]).read_text()
        if text.count(b.old) != 1:
            raise SystemExit(f"plant_bugs: {b.name}: the text to replace occurs {text.count(b.old)} "
                             f"times in {FILES[b.file]} (expected once); update BUGS: {b.old!r}")
    base = scratch_copy(None)
    try:
        check_isolation(base)
        if args.baseline:
            tests = sorted({t for b in bugs for t in b.tests})
            code, failed, tail = run_tests(base, tests)
            if code != 0:
                print(tail)
                raise SystemExit(f"plant_bugs: the tests fail without any planted bug: {failed}")
            print(f"baseline: {len(tests)} test selection(s) pass without bugs")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(try_bug, bugs))
    missed = [r for r in results if not r["caught"]]
    for r in results:
        b = r["bug"]
        status = "caught" if r["caught"] else f"MISSED (pytest exit {r['code']})"
        print(f"{b.name:32} {status:10} {r['seconds']:5.0f}s  {', '.join(r['by']) or '-'}")
    for r in missed:
        print(f"\n--- {r['bug'].name}: {r['bug'].what}\n{r['tail']}")
    print(f"\n{len(results) - len(missed)}/{len(results)} planted bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
