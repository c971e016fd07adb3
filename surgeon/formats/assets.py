"""Keras assets (``assets/...`` members of a ``.keras``): lookup vocabularies of
``StringLookup``/``IntegerLookup``/``TextVectorization`` layers, stored beside the
weights. Tensors alone do not describe such a model: diff, audit and convert look at the
assets too.
"""
from __future__ import annotations

SPECIAL = {"", "[UNK]", "[MASK]", "-1", "0"}


def of(reader) -> dict:
    """``{member: bytes}`` of a reader's assets (empty for formats without them)."""
    raw = getattr(reader, "raw", None) or {}
    return {k: v for k, v in raw.items() if k.startswith("assets/") and not k.endswith("/")}


def differ(ra, rb) -> list:
    """``[(member, status)]`` for assets that differ between two readers."""
    a, b = of(ra), of(rb)
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in b:
            out.append((k, "removed"))
        elif k not in a:
            out.append((k, "added"))
        elif a[k] != b[k]:
            out.append((k, "changed"))
    return out


def empty_vocabularies(reader) -> list:
    """Vocabulary members holding no token besides the OOV/mask ones."""
    out = []
    for k, v in of(reader).items():
        if k.endswith("vocabulary.txt"):
            tokens = {t.strip() for t in v.decode("utf-8", "replace").splitlines()}
            if not tokens - SPECIAL:
                out.append(k)
    return out
