"""The guest server's context and card-handle numbers, unique across all client connections."""

from __future__ import annotations

import secrets
from typing import Generic, TypeVar

Owner = TypeVar("Owner")


class HandleRegistry(Generic[Owner]):
    """Random positive 31-bit ids like pcscd's. Contexts are unique across connections so that
    SCardCancel, which names a context from another socket, finds the right one; card handles
    so that one connection can never name another's."""

    def __init__(self) -> None:
        self._contexts: dict[int, Owner] = {}
        self._cards: set[int] = set()

    def add_context(self, owner: Owner) -> int:
        h_context = self._new_id(self._contexts)
        self._contexts[h_context] = owner
        return h_context

    def remove_context(self, h_context: int) -> None:
        self._contexts.pop(h_context, None)

    def context_owner(self, h_context: int) -> Owner | None:
        return self._contexts.get(h_context)

    def add_card(self) -> int:
        h_card = self._new_id(self._cards)
        self._cards.add(h_card)
        return h_card

    def remove_card(self, h_card: int) -> None:
        self._cards.discard(h_card)

    @property
    def context_count(self) -> int:
        return len(self._contexts)

    @property
    def card_count(self) -> int:
        return len(self._cards)

    @staticmethod
    def _new_id(taken: dict[int, Owner] | set[int]) -> int:
        while True:
            value = secrets.randbits(31)
            if value and value not in taken:
                return value
