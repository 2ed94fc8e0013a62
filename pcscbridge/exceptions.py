"""Helpers for trio's exception groups."""

from __future__ import annotations


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first leaf exception of a (nested) exception group, for a log line."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
