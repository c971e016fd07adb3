"""The explicit, static registry of ops: name -> Op instance."""
from __future__ import annotations

from .cast import Cast
from .clip import Clip
from .mask import Mask
from .merge import Merge
from .noise import Noise
from .reinit import Reinit
from .rename import Delete, Rename
from .rescale import Rescale
from .shrink_perturb import ShrinkPerturb
from .transfer import Transfer
from .transplant import Transplant
from .zero import Zero

OPS = {op.name: op for op in (Zero(), Rescale(), Clip(), Reinit(), Noise(), ShrinkPerturb(),
                              Cast(), Mask(), Transfer(), Transplant(), Rename(), Delete(),
                              Merge())}


def get(name, where):
    from surgeon.core.errors import RecipeError
    try:
        return OPS[name]
    except KeyError:
        raise RecipeError(f"{where}: unknown op {name!r}; ops: {', '.join(sorted(OPS))}") from None
