"""The reader protocol's lookups (``entries()``, ``entry(name)``) over a reader's list of
canonical entries, shared by the readers that keep one (``self._entries``, indexed by
name in ``self._by_name``; errors name the checkpoint by ``self.label``)."""
from __future__ import annotations

from surgeon.core.errors import FormatError, SurgeonError


class EntryIndex:
    """Mixin for readers: ``entries()`` and ``entry(name)``."""

    _entries: list
    _by_name: dict

    def _index(self, entries):
        """Keep ``entries``, refusing two that map to the same canonical name."""
        self._entries, self._by_name = list(entries), {}
        for e in self._entries:
            if e.name in self._by_name:
                raise FormatError(f"{self.label}: two tensors map to the canonical name {e.name!r}")
            self._by_name[e.name] = e

    def entries(self):
        return list(self._entries)

    def entry(self, name):
        try:
            return self._by_name[name]
        except KeyError:
            raise SurgeonError(f"{self.label}: no tensor named {name!r}") from None
