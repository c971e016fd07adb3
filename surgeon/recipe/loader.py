"""Load a recipe from ``recipe.py`` (runs the file) or ``recipe.toml`` (runs no code)."""
from __future__ import annotations

import dataclasses
import re
import runpy
import traceback
from pathlib import Path

from surgeon.core.errors import RecipeError, SurgeonError
from .declare import declare, redeclare
from .schema import Recipe, Where, check_iteration

TOP_KEYS = ("input", "output", "model", "iteration", "sources", "ops")


def load_recipe(path) -> Recipe:
    """The frozen ``Recipe`` declared by ``path`` (``.py`` or ``.toml``); nothing is applied."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    if path.suffix == ".toml":
        rec = _load_toml(path, text)
    elif path.suffix == ".py":
        rec = _load_py(path)
    else:
        raise RecipeError(f"{path}: a recipe is a .py or a .toml file")
    return dataclasses.replace(rec, path=str(path), text=text)


def _load_py(path: Path) -> Recipe:
    try:
        ns = runpy.run_path(str(path), run_name="__surgeon_recipe__")
    except SurgeonError:
        raise
    except SyntaxError as exc:
        raise RecipeError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - any error in user code becomes one line
        line = next((f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__))
                     if Path(f.filename).resolve() == path.resolve()), 0)
        raise RecipeError(f"{path}:{line}: {type(exc).__name__}: {exc}") from None
    found = ns.get("RECIPE")
    if not isinstance(found, Recipe):
        found = [v for v in ns.values() if isinstance(v, Recipe)]
        if len(found) != 1:
            raise RecipeError(f"{path}: declare exactly one recipe, e.g. RECIPE = recipe(...) "
                              f"(found {len(found)})")
        found = found[0]
    return found


def _op_lines(text):
    return [i + 1 for i, ln in enumerate(text.splitlines()) if re.match(r"\s*\[\[\s*ops\s*\]\]", ln)]


def _load_toml(path: Path, text: str) -> Recipe:
    import tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: invalid TOML: {exc}") from None
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise RecipeError(f"{path}:1: unknown key {unknown[0]!r}; keys: {', '.join(TOP_KEYS)}")
    lines = _op_lines(text)
    ops = []
    for i, raw in enumerate(data.get("ops", [])):
        where = Where(str(path), lines[i] if i < len(lines) else 0)
        raw = dict(raw)
        name = raw.pop("op", None)
        if not name:
            raise RecipeError(f"{where}: each [[ops]] needs op = \"NAME\"")
        ops.append(declare(name, raw, where))
    where = Where(str(path), 1)
    return Recipe(input=data.get("input"), output=data.get("output"), ops=tuple(ops),
                  iteration=check_iteration(data.get("iteration", "keep"), where),
                  model=data.get("model"), sources=tuple(sorted(data.get("sources", {}).items())),
                  path=str(path), where=where)


def parse_value(text: str):
    """A ``--set`` value: TOML syntax if it parses (numbers, booleans, arrays), else a string."""
    import tomllib
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(rec: Recipe, input=None, output=None, sets=(), model=None) -> Recipe:
    """Apply ``-i``, ``-o``, ``--model`` and ``--set key=value`` overrides.

    Keys: ``input``, ``output``, ``model``, ``iteration``, ``sources.NAME`` and
    ``ops.N.PARAM`` (N counts from 0 in declaration order).
    """
    changes = {k: v for k, v in (("input", input), ("output", output), ("model", model)) if v}
    ops = list(rec.ops)
    sources = dict(rec.sources)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE")
        key, value = key.strip(), parse_value(value.strip())
        parts = key.split(".")
        if key in ("input", "output", "model"):
            changes[key] = str(value)
        elif key == "iteration":
            changes["iteration"] = check_iteration(value, Where("--set", 0))
        elif parts[0] == "sources" and len(parts) == 2:
            sources[parts[1]] = str(value)
        elif parts[0] == "ops" and len(parts) == 3 and parts[1].isdigit():
            n = int(parts[1])
            if n >= len(ops):
                raise RecipeError(f"--set {key}: the recipe has {len(ops)} ops (numbered from 0)")
            ops[n] = redeclare(ops[n], {parts[2]: value})
        else:
            raise RecipeError(f"--set {key}: unknown key; use input, output, model, iteration, "
                              "sources.NAME or ops.N.PARAM")
    return dataclasses.replace(rec, ops=tuple(ops), sources=tuple(sorted(sources.items())), **changes)
