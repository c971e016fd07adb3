"""The package layout is the architecture: layers import only downwards (issue 13).

Every import statement of every module under ``surgeon/`` is read with ``ast`` -- the lazy ones
inside functions included -- and checked against one table, ``LAYERS``. A module may import
from its own unit and from units of strictly lower layers; units sharing a layer are siblings
and do not import each other. The tree itself is checked too: no loose modules beside the
packages, every package in the table, every package with a docstring saying what it owns and
what it may import, and no deep relative imports (``from ..x``), which break when code moves.
"""
import ast
from pathlib import Path

import pytest

import surgeon

ROOT = Path(surgeon.__file__).parent

# Lowest layer first. A module belongs to the unit with the longest matching prefix.
LAYERS = [
    ("surgeon.core",),                  # Entry tree, errors, atomic writing
    ("surgeon.binding", "surgeon.merging"),  # slots <-> params, layer tables; merge arithmetic
    ("surgeon.formats",),               # one reader/writer module per on-disk format
    ("surgeon.structure",),             # whole-model structural surgery (config + weights + slots)
    ("surgeon.recipe.schema",),         # the recipe's types (OpSpec, Selector, Recipe): ops use them
    ("surgeon.ops",),                   # one file per tensor op + the static registry
    ("surgeon.recipe", "surgeon.inspect", "surgeon.convert"),  # declare..execute; diff/audit; convert
    ("surgeon.train",),                 # resume loop, in-training edits, RecipeCallback
    ("surgeon.cli",),                   # thin click commands
    ("surgeon",),                       # __init__ (public API), __main__, keras (public alias)
]
LOOSE_MODULES = {
    "__init__.py": "the public API",
    "__main__.py": "python -m surgeon",
    "keras.py": "public path surgeon.keras.RecipeCallback (an import path needs a module)",
}


def _layer(module):
    """(layer index, unit) of a module name."""
    best = None
    for i, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and \
                    (best is None or len(unit) > len(best[1])):
                best = (i, unit)
    return best


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        yield ".".join(parts[:-1] if is_pkg else parts), is_pkg, path


def _exists(module):
    rel = Path(*module.split("."))
    return (ROOT.parent / rel.with_suffix(".py")).exists() or (ROOT.parent / rel / "__init__.py").exists()


def _imports(module, is_pkg, source):
    """(line, imported module) for every surgeon import in ``source``, lazy ones included."""
    package = module if is_pkg else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "surgeon":
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if target.split(".")[0] != "surgeon":
                continue
            for a in node.names:  # ``from surgeon import structure`` imports surgeon.structure
                sub = f"{target}.{a.name}"
                yield node.lineno, sub if _exists(sub) else target


def _violations(module, is_pkg, source):
    layer, unit = _layer(module)
    for line, target in _imports(module, is_pkg, source):
        t_layer, t_unit = _layer(target)
        if t_unit != unit and t_layer >= layer:
            yield (f"{line}: {module} ({unit}) imports {target} "
                   f"({t_unit}, {'above' if t_layer > layer else 'sibling'})")


def test_no_module_imports_from_a_layer_above_or_a_sibling():
    bad = [f"{path.relative_to(ROOT.parent)}:{v}" for module, is_pkg, path in _modules()
           for v in _violations(module, is_pkg, path.read_text())]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_checker_reports_planted_upward_and_sibling_imports():
    up = "def f():\n    from surgeon.cli import main\n"           # lazy, upward
    sibling = "from surgeon.inspect import diff\n"               # recipe -> inspect
    ops_on_engine = "from surgeon.recipe.plan import make_plan\n"  # ops -> recipe engine
    down = "from surgeon.core.errors import SurgeonError\nfrom . import keras_h5\n"
    assert [v.split(" (")[0] for v in _violations("surgeon.formats.fake", False, up)] == \
        ["2: surgeon.formats.fake"]
    assert list(_violations("surgeon.recipe.fake", False, sibling))
    assert list(_violations("surgeon.ops.fake", False, ops_on_engine))
    assert not list(_violations("surgeon.ops.fake", False, "from surgeon.recipe.schema import OpSpec\n"))
    assert not list(_violations("surgeon.formats.fake", False, down))


def test_no_loose_modules():
    loose = {p.name for p in ROOT.glob("*.py")}
    assert loose <= set(LOOSE_MODULES), f"modules beside the packages: {sorted(loose - set(LOOSE_MODULES))}"


def test_every_package_is_placed_and_says_what_it_owns_and_may_import():
    placed = {u for units in LAYERS for u in units}
    for module, is_pkg, path in _modules():
        if not is_pkg or module == "surgeon":
            continue
        if module.count(".") == 1:
            assert module in placed, f"{module}: add the package to LAYERS in {__file__}"
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert len(doc.split()) >= 15 and "import" in doc, \
            f"{path}: the package docstring must say what it owns and what it may import"


def test_no_deep_relative_imports():
    deep = [f"{path.relative_to(ROOT.parent)}:{node.lineno}"
            for _, _, path in _modules() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level >= 2]
    assert not deep, f"use absolute imports (from surgeon.x import ...): {deep}"


@pytest.mark.parametrize("name", ["open_checkpoint", "open_writer", "load_recipe", "apply",
                                  "diff_checkpoints", "audit_checkpoint", "convert_checkpoint"])
def test_public_api_kept(name):
    assert callable(getattr(surgeon, name))


def test_public_paths_of_the_training_side():
    import surgeon.keras
    from surgeon.train import callback
    assert surgeon.keras.RecipeCallback is callback.RecipeCallback
    assert surgeon.keras.ClipConstraint is callback.ClipConstraint
    assert callable(surgeon.resume)
