#!/usr/bin/env python
"""Planted bugs: does the test suite catch realistic mistakes?

Each bug below is an exact text replacement in one module of the package. For every bug,
the repository's ``surgeon/`` and ``tests/`` are copied into a scratch directory (the other
top-level entries are symlinked), the bug is planted in the copy (the script fails loudly
when the old text is not found exactly once: the bug list is out of date), and the bug's
tests run there in one ``pytest -x`` session with the copy first on the path: in a child
forked from a server that has imported TensorFlow and Keras once (never surgeon or the
tests), so a bug costs its tests, not a TensorFlow import (``--no-fork``: a new process).
The script exits non-zero unless every bug is caught, and prints which test caught each one.

Usage:
    python tools/plant_bugs.py                  # all bugs, 2 at a time
    python tools/plant_bugs.py --jobs 1 adam-slot-order follow-power
    python tools/plant_bugs.py --baseline       # first check the tests pass without bugs
    python tools/plant_bugs.py --list

A new invariant gets a planted bug here. When modules move, update ``FILES`` (one table).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
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
    "cli": "surgeon/cli/__init__.py",
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
    "orbax_names": "surgeon/formats/orbax_names.py",
    "structure_kinds": "surgeon/structure/kinds.py",
    "structure_graph": "surgeon/structure/graph.py",
    "journal": "surgeon/core/journal.py",
    "inplace": "surgeon/formats/inplace.py",
    "provenance": "surgeon/formats/provenance.py",
    "executors": "surgeon/recipe/executors.py",
    "ray_shards": "surgeon/recipe/ray_shards.py",
    "ray_parts": "surgeon/recipe/ray_parts.py",
    "orbax_shards": "surgeon/formats/orbax_shards.py",
    "convert_shards": "surgeon/convert/shards.py",
    "core_tf": "surgeon/core/tf.py",
    "convert_lazy": "surgeon/convert/lazy.py",
    "rawread": "surgeon/formats/rawread.py",
    "rawpatch": "surgeon/formats/rawpatch.py",
    "fastio": "surgeon/core/fastio.py",
    "startup": "surgeon/core/startup.py",
    "rawbehind": "surgeon/formats/rawbehind.py",
}


@dataclass(frozen=True)
class Bug:
    name: str
    file: str  # key of FILES
    old: str
    new: str
    tests: tuple  # pytest node ids (relative to the repository)
    what: str
    fresh: bool = False  # its tests need a process without TensorFlow (never the zygote)


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
    Bug("zip-crc-not-updated", "keras_zip", "crc = fastio.crc32(block, crc)", "fastio.crc32(block, crc)",
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
    Bug("orbax-commit-marker-early", "orbax_writer",
        "        copy_except_item(w.step_dir, out_step, w.item, keys)\n",
        "        copy_except_item(w.step_dir, out_step, w.item, keys)\n"
        "        (out_step / COMMIT).write_bytes(b'early')\n",
        ("tests/test_orbax.py::test_memory_url_read_edit_write_through_the_library_api",),
        "an Orbax output on an object store is marked committed before its arrays are written"),
    Bug("orbax-url-marker-unchecked", "orbax_layout",
        "    if isinstance(ckpt, KvPath) and not (ckpt / COMMIT).is_file():", "    if False:",
        ("tests/test_orbax.py::test_memory_url_read_edit_write_through_the_library_api",),
        "a step on an object store without Orbax's commit_success.txt (incomplete) is read"),
    Bug("orbax-frozen-as-state", "orbax_names",
        '    frozen = leaf.keys[0] == "non_trainable_variables" and _frozen_param(path, by_name)',
        "    frozen = False",
        ("tests/test_orbax.py::test_sequential_names_drop_the_model_name_keras_puts_in_front",),
        "a frozen layer's weights in an Orbax checkpoint listed as state, not frozen params"),
    Bug("orbax-step-option-ignored", "orbax_layout",
        "            step = _SELECTED.get(_root_key(label))", "            step = None",
        ("tests/test_orbax.py::test_step_option_on_diff_audit_apply",),
        "--step on diff/audit/apply reads the latest step of an Orbax root instead"),
    Bug("orbax-malloc-unbounded", "orbax",
        '        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold))', "        pass",
        ("tests/test_orbax.py::test_freed_array_buffers_go_back_to_the_os",),
        "freed array buffers stay in glibc's heaps: a streaming copy's RSS grows past one array"),
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
        "self._member.crc ^= crc_shift(linear, after)",
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
    Bug("ray-orbax-unmerged", "orbax_shards", "        _merge(writer, indices)\n",
        "        pass\n",
        ("tests/test_executors.py::test_ray_orbax_equals_local",),
        "the Ray tasks' ocdbt.process_<k> databases are never merged into the root manifest"),
    Bug("ray-parts-copy-edited", "ray_parts", "for k in sorted(sizes) if k not in owner]",
        "for k in sorted(sizes)]",
        ("tests/test_executors.py::test_ray_orbax_equals_local",),
        "a Ray part also copies the input's value of a key another part edits"),
    Bug("orbax-fill-value-chunk-dropped", "orbax_writer",
        ', "metadata": meta,\n                "store_data_equal_to_fill_value": True}',
        ', "metadata": meta}',
        ("tests/test_orbax.py::test_values_equal_to_the_fill_value_are_stored",),
        "an array equal to zarr's fill value (an iteration reset to 0) is written without its chunk"),
    # merge and convert by executor (issue 18): a worker computes what the driver would
    Bug("merge-worker-models-reversed", "op_merge", "got[index] = (models, ",
        "got[index] = (models[::-1], ",
        ("tests/test_executors_merge.py::test_merge_pool_and_ray_identical_to_local",),
        "a pool/Ray worker reopens the merged models in another order (per-model weights swapped)"),
    Bug("convert-shard-task-sorted", "convert_shards", 'for target, source in job["pairs"]:',
        'for target, source in sorted(job["pairs"]):',
        ("tests/test_executors_merge.py::test_convert_sharded_pool_and_ray_identical_to_local",),
        "a convert shard task writes its tensors by name, not in the local writer's order "
        "(the shard's bytes differ)"),
    Bug("light-keras-imports-tf-to-serialise", "core_tf",
        '.tensorflow._available = False', '.tensorflow._available = None',
        ("tests/test_light_keras.py::test_the_light_process_never_loads_tensorflow",),
        "light Keras asks tf.available while serialising a config: TensorFlow loads after all"),
    Bug("light-keras-int-dtype-not-as-on-tf", "core_tf", "    _as_on_tensorflow()\n", "",
        ("tests/test_light_keras.py::test_light_output_is_the_tensorflow_routes[convert_k22_lstm]",),
        "the light route writes the optimizer's iteration counter as int32 (TensorFlow: int64)"),
    Bug("lazy-skeleton-kept-left-empty", "convert_lazy",
        "    if not lazy.by_path:\n        return []", "    if True:\n        return []",
        ("tests/test_light_keras.py::test_light_output_is_the_tensorflow_routes[convert_kept]",),
        "convert --allow-missing leaves Keras' initial values unwritten (an empty, all-zero dataset)"),
    Bug("hash-recorded-as-sha256", "provenance",
        'return {"sha256": digest if algorithm == "sha256" else None}',
        'return {"sha256": digest}',
        ("tests/test_fast_io.py::test_input_hash_is_recorded_under_its_algorithm",),
        "a BLAKE3 content hash recorded under the sha256 key (the log names the wrong hash)"),
    Bug("overlay-compares-page-heads", "journal",
        "changed.append((page if b - a == PAGE else page[:b - a]) != old[a:b])",
        "changed.append(page[:64] != old[a:a + 64])",
        ("tests/test_inplace.py::test_overlay_sees_and_commits_exactly_what_was_written",),
        "the in-place overlay compares only the start of each page: later changes are never written"),
    # fast full rewrites (issue 14 goal 4): raw reads are HDF5's reads; workers adopt the plan
    Bug("raw-read-ignores-member-offset", "rawread", "k = os.preadv(fd, [buf[got:]], base + off + got)",
        "k = os.preadv(fd, [buf[got:]], off + got)",
        ("tests/test_executors.py::test_raw_reads_are_hdf5_reads",),
        "a raw read of a .keras tensor ignores where the weights member starts in the zip"),
    Bug("pool-workers-reparse-input", "executors",
        'if mp.get_start_method() == "fork" and ctx.forkable():',
        'if mp.get_start_method() == "fork" and not ctx.forkable():',
        ("tests/test_executors.py::test_pool_identical_to_local_keras",),
        "forked pool workers open and parse the input again instead of adopting the planned context",
        fresh=True),  # with TensorFlow loaded the pool forks no worker: the check needs a TF-free run
    Bug("raw-write-skips-late-change", "rawpatch", "if diff[:4096].any() or diff.any():",
        "if diff[:4096].any():",
        ("tests/test_recipe_writers.py::test_raw_sink_writes_every_change_and_reports_its_crc",),
        "a raw write whose first 4 kB are unchanged is skipped as if nothing changed"),
    # one-tensor edits (issue 14 goals 1-2): the clone stops at the weights member, start-up
    Bug("short-clone-padded", "keras_patch",
        "if not self._clone or os.path.getsize(self._tmp) < end:", "if not self._clone:",
        ("tests/test_fast_io.py::test_short_clone_is_copied_again_not_padded",),
        "a .keras clone shorter than the weights member's end is adopted and padded with zeros"),
    Bug("keras-clone-copies-everything", "fastio",
        "elif length is not None and length < size:", "elif False:",
        ("tests/test_fast_io.py::test_keras_clone_stops_at_the_weights_member_and_is_not_truncated",),
        "the .keras clone copies the whole file, then truncates it (waiting for its writeback)"),
    Bug("h5py-import-forks-uname", "startup",
        "        sys.meta_path.insert(0, _H5pyImport)", "        pass",
        ("tests/test_fast_io.py::test_reading_an_h5_file_from_the_command_line_runs_no_child_process",),
        "importing h5py from the CLI runs `uname -p` in a child process (~50 ms per command)"),
    Bug("raw-behind-drops-crc", "rawbehind", "self._done.extend(out)", "self._done.extend(out[:0])",
        ("tests/test_recipe_writers.py::test_background_raw_writes_equal_inline_ones",),
        "the background raw writer loses the CRC changes of the tensors it wrote"),
    Bug("patch-finalize-ignores-behind", "keras_patch", "self.absorb(self.sink.finish())",
        "self.sink.finish()",
        ("tests/test_fast_io.py::test_full_rewrite_written_behind_equals_the_rebuilt_output",),
        "the .keras patch writer closes the member without the background writes' CRC changes"),
    Bug("raw-behind-error-lost", "rawbehind", "self._error = exc", "self._error = None",
        ("tests/test_recipe_writers.py::test_background_raw_write_error_reaches_the_caller",),
        "a background raw write that fails is not reported (the output is committed short)"),
    Bug("raw-crc-piece-unshifted", "rawpatch", "        elif changed:\n            linear = _shift(linear, k)\n",
        "",
        ("tests/test_recipe_writers.py::test_background_raw_writes_equal_inline_ones",),
        "a tensor's CRC change computed piece by piece skips the shift over an unchanged piece"),
    Bug("fast-crc-drops-running-value", "fastio", "return _crc32(data, value)", "return _crc32(data)",
        ("tests/test_fast_io.py::test_fast_crc32_is_zlibs",),
        "the fast CRC-32 ignores the running value (a member's CRC continued block by block)"),
    # the shell registers a user's Keras classes (surgeon --import)
    Bug("import-option-not-imported", "cli",
        '        usermod.import_module(spec, "--import")',
        '        usermod.is_path(spec)',
        ("tests/test_subclassed.py::test_import_option_names_custom_classes_from_the_shell",),
        "surgeon --import accepts the module but never imports it: custom classes stay positional"),
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


PYTEST_ARGS = ("-o", "addopts=", "-x", "-q", "-rfE", "-p", "no:cacheprovider")


def run_tests(root: Path, tests, zygote=None, timeout=None) -> tuple[int, list, str]:
    """(pytest exit code, failed/errored node ids, output tail) for ``tests`` in ``root``:
    in a child forked by ``zygote`` (TensorFlow already imported), else a new process.
    A run longer than ``timeout`` seconds is killed with everything it started (its own
    process group) and reported as ``TIMED_OUT``."""
    if zygote is not None:
        code, out = zygote.run(root, tests, timeout)
    else:
        env = dict(os.environ, PYTHONPATH=str(root), TF_CPP_MIN_LOG_LEVEL="3")
        env.pop("PYTEST_ADDOPTS", None)
        # -o addopts=: in-process, without the suite's xdist worker (whose -x exits 2, not 1)
        cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests]
        with tempfile.TemporaryFile("w+", errors="replace") as log:
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid)
                proc.wait()
                code = TIMED_OUT
            log.seek(0)
            out = log.read()
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return code, failed, out[-3000:]


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (a bug's pytest and every process it started)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- the zygote: third-party modules imported once, a forked child per bug ----------------
# Importing TensorFlow and Keras costs ~8 s of CPU; a child forked from a process that has
# imported them (and nothing of surgeon or the tests) starts at once and imports surgeon,
# conftest and the tests from its scratch copy, as a new process would.
PRELOAD = ("numpy", "h5py", "click", "pytest", "tensorflow", "keras")
CRASHED = -1  # the child died without reporting (a native crash)
NOT_ISOLATED = 99  # the child imported surgeon from elsewhere than its scratch copy
INTERNAL_ERROR = 3  # pytest's own exit code for an INTERNALERROR
TIMED_OUT = -2  # killed after --timeout seconds (a hang: the suite has no per-test timeout)


START_TIMEOUT = 300  # seconds for the forking server to import TensorFlow and Keras


class ZygoteFailed(Exception):
    pass


class Zygote:
    """Client side: starts ``plant_bugs.py --serve`` and asks it to run a bug's tests."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="planted-zygote-"))
        self.sock = str(self.dir / "sock")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
        env.pop("PYTHONPATH", None)  # nothing of the repository importable in the server
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve",
                                      self.sock], cwd=self.dir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        import select
        ready = select.select([self.proc.stdout], [], [], START_TIMEOUT)[0]
        if not ready or self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise ZygoteFailed("the forking server did not start")
        self._n = 0

    def run(self, root: Path, tests, timeout=None) -> tuple[int, str]:
        self._n += 1
        log = self.dir / f"{root.name}.{self._n}.log"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.sock)
            s.sendall((json.dumps({"root": str(root), "tests": list(tests), "log": str(log)})
                       + "\n").encode())
            s.settimeout(timeout)
            f = s.makefile()
            try:
                first = f.readline().split()  # "pid N": the child leads its process group
                if first[:1] != ["pid"]:
                    return CRASHED, ""
                pid = int(first[1])
                reply = f.read().strip()
            except (socket.timeout, TimeoutError):
                if "pid" in locals():
                    kill_group(pid)
                reply = str(TIMED_OUT)
        out = log.read_text(errors="replace") if log.exists() else ""
        return (int(reply) if reply else CRASHED), out

    def close(self):
        """Stop the server (it waits for its children); killed if it does not answer."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(self.sock)
                s.sendall(b'{"stop": true}\n')
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def serve(sock_path: str) -> None:
    """Server side: import PRELOAD, then fork a child per request (see ``_child``)."""
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    if any(m == "surgeon" or m.startswith("surgeon.") for m in sys.modules):
        raise SystemExit("plant_bugs: the forking server imported surgeon")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        req = json.loads(conn.makefile().readline())
        if req.get("stop"):
            break
        if os.fork() == 0:
            srv.close()
            os.setsid()  # its own process group: a hung bug is killed with all it started
            conn.sendall(f"pid {os.getpid()}\n".encode())
            code = CRASHED
            try:
                code = _child(req)
            finally:
                conn.sendall(f"{code}\n".encode())
                os._exit(0)
        conn.close()
        _reap(os.WNOHANG)
    _reap(0)


def _reap(flags) -> None:
    """Wait for the finished children (``flags`` 0: for all of them)."""
    while True:
        try:
            if os.waitpid(-1, flags)[0] == 0:
                return
        except ChildProcessError:
            return


def _child(req) -> int:
    """In the forked child: pytest on the request's tests, in its scratch copy."""
    root = req["root"]
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.chdir(root)
    os.environ["PYTHONPATH"] = root  # for the subprocesses the tests start
    os.environ.pop("PYTEST_ADDOPTS", None)
    sys.path[:0] = [root]
    import pytest
    code = int(pytest.main([*PYTEST_ARGS, *req["tests"]]))
    mod = sys.modules.get("surgeon")
    if mod is not None and not Path(mod.__file__).resolve().is_relative_to(Path(root).resolve()):
        print(f"plant_bugs: surgeon imported from {mod.__file__}, not the scratch copy")
        code = NOT_ISOLATED
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def check_isolation(root: Path) -> None:
    """The scratch copy, not the repository or an installed package, is what gets imported."""
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", "import surgeon; print(surgeon.__file__)"],
                         cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    if not Path(out.strip()).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"plant_bugs: the scratch copy is not imported ({out.strip()})")


def try_bug(bug: Bug, zygote=None, timeout=None) -> dict:
    """Plant ``bug`` in a scratch copy and run its tests. A forked run that hangs or dies
    natively is retried once in a new process (forking a process that has loaded TensorFlow
    can deadlock on a lock another thread held), and so is a run that ends in a pytest
    internal error, so only the bug decides the outcome."""
    root = scratch_copy(bug)
    t0 = time.monotonic()
    note = ""
    try:
        forked = zygote is not None and not bug.fresh
        code, failed, tail = run_tests(root, bug.tests, zygote if forked else None, timeout)
        if forked and code in (TIMED_OUT, CRASHED):
            note = f" (forked run {'timed out' if code == TIMED_OUT else 'crashed'}; new process)"
            code, failed, tail = run_tests(root, bug.tests, None, timeout)
        elif code == INTERNAL_ERROR:  # e.g. CPython 3.11's AST recursion-depth race while
            # pytest renders a failure as another thread formats a traceback: run it again
            note = " (pytest internal error; new process)"
            code, failed, tail = run_tests(root, bug.tests, None, timeout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    caught = code == 1 and bool(failed)
    r = {"bug": bug, "caught": caught, "by": failed, "code": code, "tail": tail,
         "seconds": time.monotonic() - t0, "note": note}
    print(result_line(r), flush=True)  # progress as each bug finishes
    return r


def result_line(r: dict) -> str:
    if r["caught"]:
        status = "caught"
    elif r["code"] == TIMED_OUT:
        status = "MISSED (timed out)"
    else:
        status = f"MISSED (pytest exit {r['code']})"
    return (f"{r['bug'].name:32} {status:10} {r['seconds']:5.0f}s  "
            f"{', '.join(r['by']) or '-'}{r['note']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bugs", nargs="*", help="names of bugs to plant (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--baseline", action="store_true", help="first run every bug's tests unmodified")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-fork", action="store_true",
                    help="a new Python process per bug instead of a child of the forking server")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds before a bug's tests are killed as hung (default 600)")
    ap.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
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
    zygote = None
    if not args.no_fork:
        try:
            zygote = Zygote()
        except ZygoteFailed as exc:  # every bug then runs in a new process
            print(f"plant_bugs: {exc}; running each bug in a new process", flush=True)
    try:
        base = scratch_copy(None)
        try:
            check_isolation(base)
            if args.baseline:
                tests = sorted({t for b in bugs for t in b.tests})
                code, failed, tail = run_tests(base, tests, zygote)
                if code != 0:
                    print(tail)
                    raise SystemExit(f"plant_bugs: the tests fail without any planted bug: {failed}")
                print(f"baseline: {len(tests)} test selection(s) pass without bugs")
        finally:
            shutil.rmtree(base, ignore_errors=True)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda b: try_bug(b, zygote, args.timeout), bugs))
    finally:
        if zygote is not None:
            zygote.close()
    missed = [r for r in results if not r["caught"]]
    print("\nin the list's order:")
    for r in results:
        print(result_line(r))
    for r in missed:
        print(f"\n--- {r['bug'].name}: {r['bug'].what}\n{r['tail']}")
    print(f"\n{len(results) - len(missed)}/{len(results)} planted bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
