"""Restore a live model and optimizer from a surgeon reader, by canonical name.

Every weight, every optimizer slot (bound to its param by the canonical tree), the
iteration counter and the learning rate are assigned from the checkpoint. Before anything
is assigned, the two sides are compared and every problem is collected into one report:
tensors the model needs that the checkpoint lacks, tensors the checkpoint has that the
model does not use, shape mismatches, an optimizer of another kind.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from surgeon.core.errors import SurgeonError
from .mapping import VarMap


class FitError(SurgeonError):
    """The checkpoint does not fit the model; ``report`` lists every problem."""

    def __init__(self, report):
        self.report = report
        super().__init__(report.summary())


@dataclass
class FitReport:
    """What a restore consumed and what it could not match."""

    restored: list = field(default_factory=list)
    missing: list = field(default_factory=list)  # model needs, checkpoint lacks
    unexpected: list = field(default_factory=list)  # checkpoint has, model lacks
    mismatched: list = field(default_factory=list)  # (name, ckpt shape, model shape)
    optimizer_problem: str | None = None
    reset_slots: list = field(default_factory=list)  # slots left at their initial zeros
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.optimizer_problem)

    def problems(self) -> list:
        out = [f"missing from checkpoint: {n}" for n in self.missing]
        out += [f"not used by the model: {n}" for n in self.unexpected]
        out += [f"shape mismatch: {n}: checkpoint {list(a)}, model {list(b)}"
                for n, a, b in self.mismatched]
        if self.optimizer_problem:
            out.append(self.optimizer_problem)
        return out

    def summary(self) -> str:
        probs = self.problems()
        head = f"checkpoint does not fit the model: {len(probs)} problem(s)"
        hint = " (use --allow-missing to keep fresh values for missing tensors and ignore " \
               "extra ones, --reset-optimizer to start the optimizer from zero)"
        return head + hint + ("; " + "; ".join(probs[:8]) if probs else "") + \
            (f"; ... {len(probs) - 8} more" if len(probs) > 8 else "")

    def to_json(self) -> dict:
        return {"restored": len(self.restored), "missing": self.missing,
                "unexpected": self.unexpected,
                "mismatched": [[n, list(a), list(b)] for n, a, b in self.mismatched],
                "optimizer_problem": self.optimizer_problem, "reset_slots": self.reset_slots,
                "notes": self.notes, "ok": self.ok}


def _optimizer_kind(reader):
    opt = (reader.metadata() or {}).get("optimizer") or {}
    return opt.get("class_name")


def plan_restore(reader, vm: VarMap, optimizer, reset_optimizer=False) -> tuple[FitReport, list]:
    """Compare the checkpoint with the live variables; returns (report, [(entry, var)])."""
    rep, pairs = FitReport(), []
    entries = reader.entries()
    live = dict(vm.model)
    want_opt = dict(vm.optimizer) if not reset_optimizer else {}
    ck_kind = _optimizer_kind(reader)
    has_opt = any(e.role in ("slot", "optimizer") for e in entries)
    if optimizer is not None and has_opt and ck_kind and ck_kind != type(optimizer).__name__:
        msg = (f"optimizer of another kind: checkpoint has {ck_kind} state, model uses "
               f"{type(optimizer).__name__}")
        if reset_optimizer:
            rep.notes.append(msg + "; optimizer state ignored (--reset-optimizer)")
        else:
            rep.optimizer_problem = msg
            want_opt = {}
    from surgeon.core.tree import is_metric
    metrics = [e for e in entries if is_metric(e)]
    if metrics:  # Keras resets compiled metrics at every epoch: nothing to resume
        rep.notes.append(f"{len(metrics)} metric variable(s) not restored (Keras resets them)")
    for e in entries:
        name = vm.keys.get(e.key, e.name) if e.role in ("param", "state") else e.name
        if is_metric(e):
            continue
        if e.role in ("slot", "optimizer"):
            if reset_optimizer or rep.optimizer_problem:
                continue
            var = want_opt.pop(name, None)
        else:
            var = live.pop(name, None)
        if var is None:
            if not e.name.startswith("optimizer/unresolved/"):
                rep.unexpected.append(e.name)
            else:
                rep.unexpected.append(f"{e.name} (slot not bound to a param)")
            continue
        if tuple(e.shape) != tuple(var.shape):
            rep.mismatched.append((e.name, tuple(e.shape), tuple(var.shape)))
            continue
        pairs.append((e, var))
        rep.restored.append(e.name)
    rep.missing = sorted(live)
    if not reset_optimizer and not rep.optimizer_problem:
        rep.missing += sorted(n for n in want_opt if n != "optimizer/learning_rate")
        if "optimizer/learning_rate" in want_opt:
            rep.notes.append("learning rate not in checkpoint; using the compile config's")
    if reset_optimizer:
        rep.reset_slots = sorted(n for n in vm.optimizer if n != "optimizer/learning_rate")
    return rep, pairs


def apply_restore(reader, pairs) -> None:
    """Assign each checkpoint tensor to its variable (cross-replica: every replica)."""
    for e, var in pairs:
        value = reader.read(e.name)
        var.assign(np.asarray(value).astype(var.dtype, copy=False))


def restore(reader, vm: VarMap, optimizer, allow_missing=False, reset_optimizer=False) -> FitReport:
    """Check, then restore. Raises FitError (nothing assigned) unless the flags allow it."""
    rep, pairs = plan_restore(reader, vm, optimizer, reset_optimizer)
    tolerated = allow_missing and not rep.mismatched and not rep.optimizer_problem
    if not rep.ok and not tolerated:
        raise FitError(rep)
    if allow_missing and (rep.missing or rep.unexpected):
        rep.notes.append(f"--allow-missing: {len(rep.missing)} tensor(s) keep fresh values, "
                         f"{len(rep.unexpected)} checkpoint tensor(s) ignored")
    apply_restore(reader, pairs)
    return rep


def finalize_layers(model, reader) -> list:
    """What Keras' loader does besides assigning variables; returns notes.

    * ``Normalization.load_own_variables`` calls ``finalize_state()``: the mean/variance
      used by ``call`` are derived from the restored adapt state (else the layer keeps
      normalizing with its pre-restore statistics);
    * lookup layers (``StringLookup``, ``TextVectorization``, ...) read their vocabulary
      from the ``.keras`` assets (``load_assets``), as ``keras.saving.load_model`` does.
    """
    from surgeon.core.tf import tf_module
    IndexLookup = tf_module("keras.src.layers.preprocessing.index_lookup").IndexLookup
    Normalization = tf_module("keras.src.layers.preprocessing.normalization").Normalization
    notes, layers = [], list(model._flatten_layers(include_self=False, recursive=True))
    for layer in layers:
        if isinstance(layer, Normalization):
            layer.finalize_state()
    lookups = [la for la in layers if isinstance(la, IndexLookup) and la.input_vocabulary is None]
    if not lookups:
        return notes
    from surgeon.formats import assets
    if not assets.of(reader) or not getattr(reader, "zip_path", None):
        raise SurgeonError(f"{reader.path}: the model's lookup layer {lookups[0].name!r} keeps "
                           "its vocabulary in the .keras assets, which this checkpoint does not "
                           "hold; resume from the model's .keras file")
    import zipfile
    saving_lib = tf_module("keras.src.saving.saving_lib")
    with zipfile.ZipFile(reader.zip_path) as zf:
        store = saving_lib.DiskIOStore("assets", archive=zf, mode="r")
        try:
            saving_lib._load_state(model, None, store, "", visited_saveables=set())
        finally:
            store.close()
    notes.append(f"lookup vocabularies loaded from the .keras assets ({len(lookups)} layer(s))")
    return notes
