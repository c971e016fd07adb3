"""Frozen recipe declarations: what a recipe says, validated, before anything is read."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from surgeon.core.errors import RecipeError
from surgeon.core.tree import ROLES

ITERATION_WORDS = ("keep", "reset")


@dataclass(frozen=True)
class Where:
    """Where something was declared: a recipe file and line."""

    file: str = "<recipe>"
    line: int = 0

    def __str__(self):
        if self.syntax == "cli" and not self.line:
            return self.file  # "surgeon transplant", "--set": no line to point at
        return f"{self.file}:{self.line}"

    @property
    def syntax(self) -> str:
        """How parameters are written where this was declared: ``python`` (a recipe.py),
        ``toml`` (a recipe.toml) or ``cli`` (a command line such as ``surgeon transplant``)."""
        if self.file.endswith(".toml"):
            return "toml"
        if self.file.startswith(("surgeon ", "--")):
            return "cli"
        return "python"


def _toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return repr(value)


def spell(where, key: str, value) -> str:
    """``key`` set to ``value`` as the user writes it where ``where`` points: ``again=True``
    in a recipe.py, ``again = true`` in a recipe.toml, ``--on-mismatch pad`` on a command line."""
    syntax = where.syntax if isinstance(where, Where) else "python"
    if syntax == "toml":
        return f"{key} = {_toml_literal(value)}"
    if syntax == "cli" and where.file == "--set":
        return f"--set {key}={_toml_literal(value)}"
    if syntax == "cli":
        flag = "--" + key.replace("_", "-")
        return flag if value is True else f"{flag} {value}"
    return f"{key}={value!r}"


@dataclass(frozen=True)
class Selector:
    """Which tensors an op touches: glob (or ``re:`` regex) on canonical names, plus filters.

    ``roles`` defaults to weights (``param`` and ``state``); name patterns starting with
    ``optimizer/`` default to ``slot``. ``shape`` may use ``None`` as a wildcard dim.
    """

    pattern: str = "*"
    layer: str | None = None
    roles: tuple | None = None
    shape: tuple | None = None
    dtype: str | None = None

    def describe(self) -> str:
        parts = [repr(self.pattern)]
        for k in ("layer", "roles", "shape", "dtype"):
            v = getattr(self, k)
            if v is not None:
                parts.append(f"{k}={v!r}" if k != "roles" else f"role={'|'.join(v)}")
        return " ".join(parts)

    def to_json(self) -> dict:
        return {"pattern": self.pattern, "layer": self.layer,
                "roles": list(self.roles) if self.roles else None,
                "shape": list(self.shape) if self.shape is not None else None, "dtype": self.dtype}


def make_selector(value, where: Where, op: str) -> Selector:
    """A Selector from a string, a dict or a Selector."""
    if isinstance(value, Selector):
        return value
    if isinstance(value, str):
        value = {"pattern": value}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: op {op!r}: select must be a name pattern or a table, "
                          f"got {type(value).__name__}")
    unknown = set(value) - {"pattern", "name", "regex", "layer", "role", "roles", "shape", "dtype"}
    if unknown:
        raise RecipeError(f"{where}: op {op!r}: unknown select key(s) {sorted(unknown)}; "
                          "use pattern, regex, layer, role, shape, dtype")
    pattern = value.get("pattern", value.get("name", "*"))
    if value.get("regex") is not None:
        pattern = "re:" + value["regex"]
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise RecipeError(f"{where}: op {op!r}: bad regex {pattern[3:]!r}: {exc}") from None
    roles = value.get("roles", value.get("role"))
    if isinstance(roles, str):
        roles = tuple(roles.split("|"))
    if roles is not None:
        roles = tuple(roles)
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise RecipeError(f"{where}: op {op!r}: unknown role {bad[0]!r}; roles: {', '.join(ROLES)}")
    shape = value.get("shape")
    if shape is not None:
        shape = tuple(None if d in (None, -1, "*") else int(d) for d in shape)
    return Selector(pattern, value.get("layer"), roles, shape, value.get("dtype"))


@dataclass(frozen=True)
class OpSpec:
    """One declared op: its name, its parameters (a sorted tuple of pairs) and where."""

    op: str
    params: tuple
    where: Where = field(default_factory=Where)

    def get(self, key, default=None):
        return dict(self.params).get(key, default)

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    def to_json(self) -> dict:
        return {"op": self.op, "where": str(self.where),
                "params": {k: (v.to_json() if hasattr(v, "to_json") else v) for k, v in self.params}}


@dataclass(frozen=True)
class Recipe:
    """A whole recipe: input, output, named sources, iteration policy and ordered ops."""

    input: str | None
    output: str | None
    ops: tuple
    iteration: object = "keep"
    model: str | None = None
    sources: tuple = ()
    path: str = "<recipe>"
    text: str = ""
    where: Where = field(default_factory=Where)

    def source_path(self, name: str) -> str:
        return dict(self.sources).get(name, name)

    def to_json(self) -> dict:
        return {"path": self.path, "input": self.input, "output": self.output,
                "model": self.model, "iteration": self.iteration,
                "sources": dict(self.sources), "ops": [o.to_json() for o in self.ops]}


def check_iteration(value, where: Where):
    """``keep``, ``reset`` or a non-negative int (``set N``)."""
    if isinstance(value, str) and value.startswith("set "):
        value = value[4:].strip()
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not (value in ITERATION_WORDS or (isinstance(value, int) and value >= 0)):
        raise RecipeError(f"{where}: iteration must be 'keep', 'reset' or a step number >= 0, got {value!r}")
    return value
