"""In-training edits: ops applied to live variables inside the compiled training step.

Each op maps a weight tensor with TensorFlow ops and ``Variable.assign`` (no numpy round
trip, no host copy) and applies its slot policy to that weight's optimizer variables,
found through the canonical map (``mapping.VarMap.slots``). The same ops and slot
policies as the offline recipe engine (``surgeon.ops``): ``keep``, ``reset`` (slots of
touched elements to zero), ``warm`` (touched elements: first moments zero, second moments
set to the slot's mean), ``follow`` (the op's own scale applied to the slots: ``c`` for
first moments, ``c**2`` for second moments).
"""
from __future__ import annotations

import fnmatch
import re
import zlib

from surgeon.core.tf import import_tf
from surgeon.core.errors import RecipeError

SECOND_MOMENT = {"velocity", "velocity_hat", "accumulator", "accumulated_grad",
                 "accumulated_delta_var", "norm"}


def _power(slot: str) -> int:
    return 2 if slot in SECOND_MOMENT else 1


class Edit:
    """Base class: ``select`` (glob, or ``re:`` regex, on canonical names) and ``slots``."""

    name = ""
    slot_policies = ("keep", "reset", "warm")
    default_slots = "keep"

    def __init__(self, select="*", slots=None):
        self.select = select
        self.slots = slots or self.default_slots
        if self.slots not in self.slot_policies:
            raise RecipeError(f"in-training op {self.name!r}: slot policy {self.slots!r} not "
                              f"available; choose one of {', '.join(self.slot_policies)}")

    def matches(self, name: str) -> bool:
        pat = self.select
        if pat.startswith("re:"):
            return re.search(pat[3:], name) is not None
        return fnmatch.fnmatchcase(name, pat)

    def transform(self, w, ctx):
        """(new value, touched boolean tensor or None for all, follow scale or None)."""
        raise NotImplementedError

    def __repr__(self):
        return f"{self.name}(select={self.select!r}, slots={self.slots!r})"


class Zero(Edit):
    name, default_slots = "zero", "reset"

    def transform(self, w, ctx):
        tf = import_tf()
        return tf.zeros_like(w), None, None


class Rescale(Edit):
    name = "rescale"
    slot_policies = ("keep", "reset", "warm", "follow")

    def __init__(self, factor, select="*", slots=None):
        super().__init__(select, slots)
        self.factor = float(factor)

    def transform(self, w, ctx):
        return w * self.factor, None, self.factor


class Clip(Edit):
    """Elementwise ``[min, max]`` clip, or a per-tensor L2 ``max_norm`` projection."""

    name = "clip"

    def __init__(self, min=None, max=None, max_norm=None, select="*", slots=None):
        super().__init__(select, slots)
        if min is None and max is None and max_norm is None:
            raise RecipeError("in-training op 'clip': give min, max or max_norm")
        self.lo, self.hi, self.max_norm = min, max, max_norm

    def transform(self, w, ctx):
        tf = import_tf()
        new = w
        if self.lo is not None:
            new = tf.maximum(new, tf.cast(self.lo, w.dtype))
        if self.hi is not None:
            new = tf.minimum(new, tf.cast(self.hi, w.dtype))
        if self.max_norm is not None:
            new = tf.clip_by_norm(new, self.max_norm)
        return new, (tf.not_equal(new, w) if self.slots != "keep" else None), None


class Mask(Edit):
    """Keep only the largest-magnitude ``1 - sparsity`` fraction (or a given bool array)."""

    name, default_slots = "mask", "reset"

    def __init__(self, sparsity=None, mask=None, select="*", slots=None):
        super().__init__(select, slots)
        if (sparsity is None) == (mask is None):
            raise RecipeError("in-training op 'mask': give exactly one of sparsity, mask")
        self.sparsity, self.mask = sparsity, mask

    def transform(self, w, ctx):
        tf = import_tf()
        if self.mask is not None:
            keep = tf.constant(self.mask, dtype=tf.bool)
        else:  # exactly round(sparsity * n) smallest |w| pruned, stable order (as surgeon.ops.mask)
            n = int(w.shape.num_elements())
            k = int(round(self.sparsity * n))
            if k <= 0:
                return w, tf.zeros_like(w, dtype=tf.bool), None
            order = tf.argsort(tf.reshape(tf.abs(w), [-1]), stable=True)[:k]
            keep = tf.tensor_scatter_nd_update(tf.ones([n], tf.bool), order[:, None],
                                               tf.zeros([k], tf.bool))
            keep = tf.reshape(keep, tf.shape(w))
        return tf.where(keep, w, tf.zeros_like(w)), tf.logical_not(keep), None


class Noise(Edit):
    """Add Gaussian noise ``std * N(0, 1)`` (``relative``: times the tensor's std);
    deterministic in (seed, tensor, step)."""

    name = "noise"

    def __init__(self, std=0.01, seed=0, relative=False, select="*", slots=None):
        super().__init__(select, slots)
        self.std, self.seed, self.relative = float(std), int(seed), bool(relative)

    def transform(self, w, ctx):
        tf = import_tf()
        std = self.std * tf.math.reduce_std(w) if self.relative else self.std
        return w + std * ctx.normal(w, self.seed), None, None


class ShrinkPerturb(Edit):
    """``shrink * w + perturb * N(0, 1)`` (Ash & Adams 2020). In training the noise is
    Gaussian (the offline op can also draw it from the weight's initializer)."""

    name, default_slots = "shrink_perturb", "reset"
    slot_policies = ("keep", "reset", "warm", "follow")

    def __init__(self, shrink=0.4, perturb=0.1, seed=0, initializer="default", select="*",
                 slots=None):
        super().__init__(select, slots)
        if initializer not in ("default", "normal", "random_normal"):
            raise RecipeError(f"in-training op 'shrink_perturb': initializer {initializer!r} "
                              "is not supported inside training; use the default (Gaussian)")
        self.shrink, self.perturb, self.seed = float(shrink), float(perturb), int(seed)

    def transform(self, w, ctx):
        return self.shrink * w + self.perturb * ctx.normal(w, self.seed), None, self.shrink


REGISTRY = {c.name: c for c in (Zero, Rescale, Clip, Mask, Noise, ShrinkPerturb)}
# parameter aliases used by the offline recipe ops
_ALIASES = {"scale": "factor", "sigma": "perturb", "stddev": "std", "norm": "max_norm",
            "min_value": "min", "max_value": "max"}


def from_spec(spec) -> Edit:
    """An in-training Edit from a recipe ``OpSpec`` (``surgeon.recipe``) or an Edit."""
    if isinstance(spec, Edit):
        return spec
    op = getattr(spec, "op", None)
    if op not in REGISTRY:
        raise RecipeError(f"{getattr(spec, 'where', '<recipe>')}: op {op!r} cannot run inside "
                          f"training; in-training ops: {', '.join(sorted(REGISTRY))}")
    kwargs = {}
    for k, v in spec.kwargs.items():
        if k == "again" or v is None:
            continue
        if k == "select":
            v = getattr(v, "pattern", v)
        kwargs[_ALIASES.get(k, k)] = v
    try:
        return REGISTRY[op](**kwargs)
    except TypeError as exc:
        raise RecipeError(f"{getattr(spec, 'where', '<recipe>')}: op {op!r}: {exc}") from None


def as_edits(recipe_or_ops) -> list:
    """Edits from a Recipe, a list of OpSpec/Edit, a single Edit, or a recipe file path."""
    if isinstance(recipe_or_ops, (str, bytes)) or hasattr(recipe_or_ops, "__fspath__"):
        from surgeon.recipe import load_recipe
        recipe_or_ops = load_recipe(recipe_or_ops)
    if hasattr(recipe_or_ops, "ops"):
        recipe_or_ops = recipe_or_ops.ops
    if isinstance(recipe_or_ops, Edit) or hasattr(recipe_or_ops, "op"):
        recipe_or_ops = [recipe_or_ops]
    return [from_spec(s) for s in recipe_or_ops]


class _Ctx:
    def __init__(self, step, name):
        self.step, self.name = step, name

    def normal(self, w, seed):
        tf = import_tf()
        key = zlib.crc32(self.name.encode()) & 0x7FFFFFFF
        s = tf.stack([tf.constant(seed * 1_000_003 + key, tf.int64),
                      tf.cast(self.step, tf.int64)])
        return tf.cast(tf.random.stateless_normal(tf.shape(w), seed=s), w.dtype)


class EditProgram:
    """Edits bound to live variables; ``run(step)`` assigns in place (graph-safe).

    Call it in cross-replica context (after ``strategy.run``, or via ``merge_call``):
    a MirroredVariable assigned there gets the same value on every replica.
    """

    def __init__(self, edits, varmap, every_n_steps=1):
        self.every = int(every_n_steps)
        if self.every < 1:
            raise RecipeError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.bound = []
        names = list(varmap.model)
        for edit in edits:
            hits = [n for n in names if edit.matches(n)]
            if not hits:
                raise RecipeError(f"in-training op {edit!r}: select matches no weight; "
                                  f"weights: {', '.join(names[:6])}...")
            for n in hits:
                self.bound.append((edit, n, varmap.model[n], varmap.slots.get(n, {})))

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def run(self, step):
        """Apply every bound edit (inside a tf.function, or eagerly)."""
        for edit, name, var, slots in self.bound:
            w = var.value if hasattr(var, "value") else var
            new, touched, scale = edit.transform(w, _Ctx(step, name))
            var.assign(new)
            for slot, svar in slots.items():
                _apply_slot_policy(edit.slots, slot, svar, touched, scale)


def _apply_slot_policy(policy, slot, svar, touched, scale):
    tf = import_tf()
    if policy == "keep":
        return
    s = svar.value if hasattr(svar, "value") else svar
    if policy == "follow":
        svar.assign(s * tf.cast(scale ** _power(slot), s.dtype))
        return
    fill = tf.zeros_like(s)
    if policy == "warm" and _power(slot) == 2:
        fill = tf.fill(tf.shape(s), tf.reduce_mean(s))
    svar.assign(fill if touched is None else tf.where(touched, fill, s))
