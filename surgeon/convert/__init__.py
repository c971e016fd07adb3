"""convert: conversion between formats, optimizer state included -- ``convert()`` (here) and
the Keras skeleton of the target (:mod:`~surgeon.convert.skeleton`). May import core, binding
and formats; Keras/TensorFlow only on use. Not recipe, ops, inspect, train or cli.

Convert any readable checkpoint to ``.keras``, ``.weights.h5`` or legacy ``.h5``,
optimizer state included.

Approach: Keras 3 writes an empty *skeleton* of the target (model compiled with the
source's optimizer, optimizer built, saved in the target format); surgeon opens it like
any checkpoint and fills every tensor from the source through the lossless writer.
Weights are matched by canonical name first, then by layer order + shapes; optimizer
slots move by (param, slot), which re-lays them out in the target optimizer's own
order; the iteration counter is copied. The result is a file Keras itself wrote the
layout of, so Keras loads it with no "Skipping variable loading for optimizer".
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surgeon.core.errors import SurgeonError
from surgeon.formats import open_checkpoint, open_writer
from surgeon.convert import shards
from surgeon.core.tree import slot_name

NO_CONFIG = ("{label}: holds no model config; pass --like MODEL.keras or --like "
             "module:function (or --model for a .weights.h5)")
# Formats whose reader needs TensorFlow and never holds a model config of its own.
TF_FORMATS_WITHOUT_CONFIG = ("tf-checkpoint", "saved-model")
TARGETS = {".weights.json": "keras-weights-sharded", ".keras": "keras", ".weights.h5": "keras-weights-h5", ".h5": "legacy-h5",
           ".hdf5": "legacy-h5", ".orbax": "orbax"}


@dataclass
class Pair:
    target: str
    source: str | None
    how: str  # name | order | slot | global | config (value from the optimizer config) |
    #           kept (Keras' initial value, --allow-missing)


@dataclass
class ConvertReport:
    """What ``convert`` did: every target tensor's source and what was left over."""

    source: str
    target: str
    target_format: str
    pairs: list = field(default_factory=list)
    unmatched_source: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    iterations: int | None = None
    optimizer: str | None = None

    def to_json(self) -> dict:
        return {"source": self.source, "target": self.target, "format": self.target_format,
                "optimizer": self.optimizer, "iterations": self.iterations,
                "pairs": [p.__dict__ for p in self.pairs],
                "unmatched_source": list(self.unmatched_source), "notes": list(self.notes)}


def target_format(dst) -> str:
    from surgeon.formats import is_url
    if is_url(dst):
        return "orbax"  # the one format written to a kvstore URL (gs://, s3://, file://...)
    name = str(dst).lower()
    for ext in (".weights.json", ".weights.h5", ".keras", ".h5", ".hdf5", ".orbax"):
        if name.endswith(ext):
            return TARGETS[ext]
    if name.endswith((".ckpt", ".index")) or "." not in Path(name).name:
        return "tf-checkpoint"  # a prefix: tf.train.Checkpoint(model=, optimizer=).write()
    raise SurgeonError(f"{dst}: unknown output format; use .keras, .weights.h5, .weights.json "
                       "(sharded), .h5, a "
                       "TF checkpoint prefix (name.ckpt, or a name without extension) or an "
                       "Orbax checkpoint directory (name.orbax)")


def _weights(entries):
    return [e for e in entries if e.role in ("param", "state")]


def _by_layer(entries):
    groups = []
    for e in entries:
        if groups and groups[-1][0] == e.layer:
            groups[-1][1].append(e)
        else:
            groups.append((e.layer, [e]))
    return groups


def match_weights(src_entries, tgt_entries, notes, by_order=True):
    """target name -> (source name, how): canonical name first, then (``by_order``) layer
    order + shapes."""
    src, tgt = _weights(src_entries), _weights(tgt_entries)
    by_name = {e.name: e for e in src}
    pairs, used = {}, set()
    for t in tgt:
        s = by_name.get(t.name)
        if s is not None and s.shape == t.shape:
            pairs[t.name] = (s.name, "name")
            used.add(s.name)
        elif s is not None:
            notes.append(f"{t.name}: same name in the source but shape {s.shape} != {t.shape}")
    # Quantized state moves only by name: its layout differs per format and mode, and
    # same-shaped tensors (an int8 layer's bias and kernel_scale) must never be swapped.
    if not by_order:
        return pairs, used
    rest_t = _by_layer([t for t in tgt if t.name not in pairs and not t.quant])
    rest_s = _by_layer([s for s in src if s.name not in used and not s.quant])
    j = 0
    for _, ts in rest_t:
        shapes = [t.shape for t in ts]
        for k in range(j, len(rest_s)):
            ss = rest_s[k][1]
            if [s.shape for s in ss] == shapes:
                for t, s in zip(ts, _by_leaf(ts, ss)):
                    pairs[t.name] = (s.name, "order")
                    used.add(s.name)
                j = k + 1
                break
    return pairs, used


def _leaf(e):
    return e.name.rsplit("/", 1)[-1]


def _by_leaf(ts, ss):
    """``ss`` reordered to pair with ``ts`` by variable name (``kernel``, ``bias``) when
    both layers name the same variables, so layer-order matching never swaps two
    same-shaped variables stored in a different order; else ``ss`` as it is."""
    by = {_leaf(s): s for s in ss}
    if len(by) == len(ss) and sorted(by) == sorted(_leaf(t) for t in ts) and all(
            by[_leaf(t)].shape == t.shape for t in ts):
        return [by[_leaf(t)] for t in ts]
    return ss


def _without_metrics(s_entries, t_entries, report):
    """Metric variables (Orbax checkpoints) move only between formats that keep them."""
    from surgeon.core.tree import is_metric
    n = sum(map(is_metric, s_entries))
    if n and not any(map(is_metric, t_entries)):
        report.notes.append(f"{n} metric variable(s) not carried (the target format keeps none)")
        s_entries = [e for e in s_entries if not is_metric(e)]
    return s_entries, t_entries


def _fresh_metrics(missing, t_entries, s_entries, report):
    """Target metric variables a source without any keeps at their initial values."""
    from surgeon.core.tree import is_metric
    if any(map(is_metric, s_entries)):
        return []
    fresh = [t.name for t in t_entries if is_metric(t) and t.name in missing]
    if fresh:
        report.notes.append(f"{len(fresh)} metric variable(s) start fresh (the source keeps none)")
    return fresh


def plan_pairs(src, skel, report, allow_missing):
    """Pair every tensor of the skeleton ``skel`` with one of ``src``."""
    s_entries, t_entries = _without_metrics(src.entries(), skel.entries(), report)
    # a TF checkpoint names every variable: pairing by layer order could only pair the
    # wrong tensors (a nested model's weights whose model name the checkpoint lacks)
    by_order = getattr(src, "format", "") not in TF_FORMATS_WITHOUT_CONFIG
    wpairs, used = match_weights(s_entries, t_entries, report.notes, by_order)
    src_names = {e.name for e in s_entries}
    missing = []
    for t in t_entries:
        if t.role in ("param", "state"):
            if t.name in wpairs:
                report.pairs.append(Pair(t.name, *wpairs[t.name]))
            else:
                missing.append(t.name)
    slot_pairs, slot_missing = _plan_slots(s_entries, t_entries, wpairs, src_names, report)
    report.pairs += slot_pairs
    used |= {p.source for p in slot_pairs}
    missing += slot_missing
    report.unmatched_source = [e.name for e in s_entries if e.name not in used
                               and e.role != "optimizer" and not e.name.startswith("optimizer/placeholder/")]
    fresh = _fresh_metrics(missing, t_entries, s_entries, report)
    missing = [m for m in missing if m not in fresh]
    report.pairs += [Pair(m, None, "kept") for m in fresh]
    if missing and not allow_missing:
        hint = "" if by_order else (
            f" (a {src.format} is paired by name only; "
            + "; ".join(n for n in getattr(src, "mapping", None) and src.mapping.notes or ()
                        if "nested models" in n)[:300] + ")")
        raise SurgeonError(f"{report.target}: {len(missing)} target tensor(s) have no source "
                           f"(first: {missing[0]}); pass --allow-missing to keep Keras' initial "
                           f"values for them, or --like a model that fits{hint}")
    report.pairs += [Pair(m, None, "kept") for m in missing]


def _plan_slots(s_entries, t_entries, wpairs, src_names, report):
    pairs, missing = [], []
    src_slots = [e for e in s_entries if e.role == "slot" and e.slot_of]
    unresolved = [e for e in s_entries if e.role == "slot" and not e.slot_of]
    t_slots = [t for t in t_entries if t.role == "slot"]
    if unresolved and t_slots:
        # Optimizer state the source holds but that cannot be tied to its weights: moving
        # none of it (a fresh optimizer) must be asked for.
        raise SurgeonError(
            f"{report.source}: cannot move the optimizer state: {len(unresolved)} of its "
            f"{len(unresolved) + len(src_slots)} slot(s) are not bound to weights "
            f"(first: {unresolved[0].name}; see `surgeon ls {report.source}`); pass --model "
            "when the source is a bare weights file, or --optimizer drop to write a fresh "
            "optimizer (zero slots, iteration 0)")
    if unresolved and not any(n.startswith("optimizer state dropped") for n in report.notes):
        report.notes.append(f"{len(unresolved)} source optimizer slot(s) are unresolved; the "
                            "target optimizer has no slots for them")
    if t_slots and not src_slots:
        report.notes.append("the source holds no bound optimizer state: the target optimizer "
                            "starts fresh (zero slots, iteration 0)")
        return [], []
    for t in t_entries:
        if t.role == "slot" and t.slot_of:
            sp = wpairs.get(t.slot_of)
            name = slot_name(sp[0], t.slot) if sp else None
            if name in src_names:
                pairs.append(Pair(t.name, name, "slot"))
            else:
                missing.append(t.name)
        elif t.role == "optimizer" and t.name in src_names:
            pairs.append(Pair(t.name, t.name, "global"))
        elif t.role == "optimizer":  # e.g. learning_rate, which Keras 2 kept only in the config
            pairs.append(Pair(t.name, None, "config"))
        elif t.role == "slot":
            missing.append(t.name)
    return pairs, missing


def _source_model(src, like, label):
    """A Keras 3 model for the target, and the compile config to fall back on."""
    from surgeon.convert import skeleton as sk
    if like is not None:
        return sk.model_from_like(like), []
    config = getattr(src, "model_config", None) or getattr(src, "config", None)
    if config is None and getattr(src, "model_json", None):
        config = src.model_json
    if not config:
        raise SurgeonError(NO_CONFIG.format(label=label))
    keys = ("class_name", "config", "module", "registered_name", "build_config")
    model, notes = sk.model_from_config({k: config[k] for k in keys if k in config}, label)
    return (model, config.get("compile_config")), notes


def _optimizer(src, compile_config, mode, report, label):
    from surgeon.convert import skeleton as sk
    if mode == "drop":
        report.notes.append("optimizer state dropped (--optimizer drop)")
        return None, None
    info = getattr(src, "optimizer", None)
    if info is not None and info.class_name:
        cls, cfg = info.class_name, info.config
    elif compile_config and compile_config.get("optimizer"):
        o = compile_config["optimizer"]
        cls, cfg = (o, {}) if isinstance(o, str) else (o.get("class_name"), o.get("config", {}))
    else:
        report.notes.append("no optimizer in the source or --like model: none written")
        return None, None
    opt, notes = sk.optimizer_from(cls, cfg, label)
    report.notes += notes
    if getattr(info, "wrapper", None):  # mixed precision: the same LossScaleOptimizer layout
        from surgeon.core.tf import import_keras_light
        opt = import_keras_light().optimizers.LossScaleOptimizer(opt)
        report.notes.append(f"{cls} wrapped in a LossScaleOptimizer, as in the source")
    report.optimizer = cls
    loss = None
    tc = getattr(src, "training_config", None) or compile_config or {}
    loss = sk._loss(tc.get("loss"))
    return opt, loss


def _assets(src, skel, fmt, report):
    """The source's assets (lookup vocabularies) to carry into the target, checked: the
    target must be a .keras whose model stores the same asset files."""
    from surgeon.formats import assets
    have, need = assets.of(src), assets.of(skel)
    if not have and not assets.empty_vocabularies(skel):
        return {}
    if have and fmt != "keras":
        raise SurgeonError(f"{report.source}: holds assets ({sorted(have)[0]}, ...: lookup "
                           f"vocabularies) that a {fmt} file cannot store; convert to .keras")
    if set(have) != set(need):
        missing = sorted(set(need) - set(have)) or sorted(set(have) - set(need))
        raise SurgeonError(f"{report.source}: the target model's assets do not match the "
                           f"source's (e.g. {missing[0]}); the lookup vocabularies cannot be "
                           "carried over: convert from the model's .keras file")
    report.notes.append(f"{len(have)} asset file(s) carried over (lookup vocabularies)")
    return have


def _writer(dst, skel, src):
    if skel.format != "orbax":
        return open_writer(dst, like=skel)
    from surgeon.formats.orbax import OrbaxWriter
    info = getattr(src, "optimizer", None)
    return OrbaxWriter(skel, dst, step=getattr(info, "iterations", None) or 0)


def _fill(src, skel, dst, report, log=None, carry=None, lazy=None):
    from surgeon.convert.lazy import fill_unwritten
    with _writer(dst, skel, src) as w:
        for member, data in (carry or {}).items():
            w.set_member(member, data)
        written = set()
        for p in report.pairs:
            if p.source is None:
                continue
            arr = shards.value(src, skel, p.target, p.source)
            w.write(p.target, arr)
            written.add(p.target)
            if p.target == "optimizer/iteration":
                report.iterations = int(np.asarray(arr).reshape(-1)[0])
            del arr  # one source tensor in memory at a time
        if lazy is not None:
            fill_unwritten(w, skel, lazy, written)
        if log is not None:
            log(w)
        w.finalize()


def _check_before_tensorflow(src_path, like, model):
    """Mistakes found without TensorFlow are reported before it loads (seconds)."""
    from surgeon.convert.skeleton import check_like
    from surgeon.formats import detect
    if like is not None:
        check_like(like)
    elif model is None and detect(src_path) in TF_FORMATS_WITHOUT_CONFIG:
        raise SurgeonError(NO_CONFIG.format(label=src_path))


def convert(src_path, dst, like=None, optimizer="keep", allow_missing=False, model=None,
            executor=None, max_shard_size=None):
    """Convert ``src_path`` to ``dst`` (format from the extension), optimizer state included.

    Args:
        src_path: any checkpoint surgeon reads.
        dst: output ``.keras``, ``.weights.h5`` or legacy ``.h5``.
        like: ``.keras`` file or ``module:function`` giving the target model (default:
            the source's own model config).
        optimizer: ``keep`` (move slots and iteration) or ``drop``.
        allow_missing: keep Keras' initial values for target tensors with no source.
        model: for a bare ``.weights.h5`` source, its ``.keras``/``config.json``.
        executor: who writes the output (``surgeon.make_executor("local"|"pool"|"ray",
            workers, address)``); pool and Ray write a sharded ``.weights.json`` target, one
            task per output shard (every worker must see the paths: a shared filesystem).
        max_shard_size: shard size of a ``.weights.json`` target in GB (default: the
            source's largest shard when it is sharded, else 5).
    Returns:
        ConvertReport.
    Example:
        >>> convert("fixtures/legacy/k20_mlp_adam.h5", "/tmp/out.keras").iterations
        37
    """
    if optimizer not in ("keep", "drop"):
        raise SurgeonError(f"--optimizer must be keep or drop, not {optimizer!r}")
    from surgeon.core import atomic
    from surgeon.formats import detect
    from surgeon.formats import is_url
    fmt = target_format(dst)
    if not is_url(dst):
        dst = Path(dst)
        atomic.check_output(dst, [src_path, model, like if like and ":" not in str(like) else None])
        if not dst.parent.exists():
            raise SurgeonError(f"{dst}: output directory {dst.parent} does not exist")
    shards.check_executor(executor, fmt, dst)
    shard_gb = shards.max_shard_gb(src_path, max_shard_size) if fmt == "keras-weights-sharded" else None
    _check_before_tensorflow(src_path, like, model)
    args = {"source": src_path, "output": dst, "like": like, "optimizer": optimizer,
            "allow_missing": allow_missing, "model": model}
    report = ConvertReport(str(src_path), str(dst), fmt)
    from surgeon.formats.provenance import Hasher
    hasher = Hasher()  # the inputs' content hashes, on another core while Keras loads
    for p in (src_path, model, like if like and ":" not in str(like) else None):
        if p is not None:
            hasher.start(p)
    spread = getattr(executor, "name", "local") != "local"  # workers read the skeleton: beside dst
    tmpdir = atomic.temp_dir(dst) if spread else tempfile.mkdtemp(prefix="surgeon-convert-")
    try:
        # a TF source takes its nested models' names from --like MODEL.keras's config
        namer = model if model is not None or like is None or ":" in str(like) or \
            detect(src_path) not in TF_FORMATS_WITHOUT_CONFIG else like
        with open_checkpoint(src_path, model=namer) as src:
            _load_keras(fmt)
            if model is not None and not getattr(src, "model_json", None):
                from surgeon.formats.keras_h5 import read_model_json
                src.model_json = read_model_json(model)
            (kmodel, compile_config), notes = _source_model(src, like, str(src_path))
            report.notes += notes
            opt, loss = _optimizer(src, compile_config, optimizer, report, str(src_path))
            from surgeon.convert import skeleton as sk
            skel_path, skel_model, lazy = sk.compile_and_save(kmodel, opt, loss, fmt, tmpdir,
                                                              shard_gb)
            with open_checkpoint(skel_path, model=skel_model) as skel:
                plan_pairs(src, skel, report, allow_missing)
                carry = _assets(src, skel, fmt, report)
                if spread:
                    job = {"src": str(src_path), "namer": namer, "model": model,
                           "skel": str(skel_path), "skel_model": skel_model}
                    shards.fill_sharded(
                        executor, skel, dst, report, job,
                        lambda info: _history(src_path, args, report, fmt, info, hasher))
                else:
                    info = shards.local_info()
                    _fill(src, skel, dst, report,
                          _logger(src_path, args, report, fmt, info, hasher), carry, lazy)
    finally:
        hasher.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return report


def _history(src_path, args, report, fmt, executor_info, hasher=True):
    """The surgery log of the output: the source's history, then this conversion."""
    from surgeon.formats import provenance
    like = args["like"] if args["like"] and ":" not in str(args["like"]) else None
    summary = {"format": fmt, "optimizer": report.optimizer, "iterations": report.iterations,
               "tensors": sum(1 for p in report.pairs if p.source is not None),
               "kept": [p.target for p in report.pairs if p.how == "kept"],
               "unmatched_source": list(report.unmatched_source), "notes": list(report.notes)}
    rec = provenance.command_record("convert", args, {"input": src_path, "model": args["model"],
                                                      "like": like}, summary, hash_inputs=hasher)
    return provenance.chained(src_path, rec | {"executor": executor_info})


def _load_keras(fmt):
    """Keras for the skeleton: on TensorFlow when the target needs it, else the light one
    (no TensorFlow in a CLI process; see ``surgeon.core.tf.import_keras_light``)."""
    from surgeon.convert import skeleton as sk
    from surgeon.core.tf import import_keras, import_keras_light
    return import_keras() if sk.needs_tensorflow(fmt) else import_keras_light()


def _logger(src_path, args, report, fmt, executor_info, hasher=True):
    """Embeds the surgery log in the output being written."""
    from surgeon.formats import provenance

    def log(writer):
        provenance.embed(writer, fmt, _history(src_path, args, report, fmt, executor_info, hasher))
    return log
