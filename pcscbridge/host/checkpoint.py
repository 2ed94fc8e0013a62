"""Checkpoints: what wraps the host service before and after every call (policy, audit).

A checkpoint gives each guest a set of rules. Its `before` hook sees every call first and may
refuse it (raise PCSCError) or rewrite it (return another call: a renamed reader mapped back
to the host's name); its `after` hook sees how the call ended (result or return code, and how
long it took); `readers` decides which readers the guest sees and under which names. Every
call passes, release and ping included, and so does the release of everything a guest held
when it goes away. A refusal is a `Refused` (a PCSCError with the reason); a checkpoint may
also answer a call itself (`Answered`: a denied APDU's SW 6982), and the outer checkpoints'
`after` hooks see the reason as `Outcome.note`. `cli/compose.py` composes them:

    service = CheckedService(CheckedService(HostService(backend), policy), audit)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..errors import BridgeError
from ..link.calls import Call, Connect, ReleaseContext
from ..pcsc import PCSCError, ReturnCode
from .readers import HostReader, ReaderSnapshot
from .service import Service, Session


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended: `rv` 0 and its `result`, or the return code it failed with."""

    rv: int
    result: Any
    duration: float  # seconds, from the before hook's return to the call's end
    note: str = ""  # why a checkpoint refused or answered the call itself


class Refused(PCSCError):
    """A checkpoint refused the call: the guest gets `rv`; `reason` is for logs and audit."""

    def __init__(self, rv: int, reason: str) -> None:
        super().__init__(rv, reason)
        self.reason = reason


class Answered(BridgeError):
    """A checkpoint answered the call itself, with `result` (rv 0), without running it."""

    def __init__(self, result: Any, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


class GuestRules(Protocol):
    """One guest's rules, made by a checkpoint for that guest."""

    async def before(self, call: Call, session: Session) -> Call:
        """The call to run (the same one, or a rewritten one); raise PCSCError to refuse.
        `session` is the wrapped session, for rules that must ask the card first."""
        ...

    def after(self, call: Call, outcome: Outcome) -> None:
        """Sees every call's end, refusals by inner checkpoints included; must not block."""
        ...

    def readers(self, readers: tuple[HostReader, ...]) -> tuple[HostReader, ...]:
        """The readers the guest may see, under the names it sees them by."""
        ...


class Checkpoint(Protocol):
    def rules_for(self, guest: str) -> GuestRules: ...


class AllowAll:
    """Rules that let everything through: the guest sees every reader, under its own name."""

    async def before(self, call: Call, session: Session) -> Call:
        return call

    def after(self, call: Call, outcome: Outcome) -> None:
        return None

    def readers(self, readers: tuple[HostReader, ...]) -> tuple[HostReader, ...]:
        return readers

    def rules_for(self, guest: str) -> GuestRules:
        return self


class ReaderRules(AllowAll):
    """Rules that show a guest some readers only, some under other names. A reader it does not
    see does not exist for it: connecting to it by name answers SCARD_E_UNKNOWN_READER."""

    def __init__(self, visible: Any = None, rename: dict[str, str] | None = None) -> None:
        self._visible = visible or (lambda name: True)  # host name -> bool
        self._to_guest = dict(rename or {})
        self._to_host = {guest: host for host, guest in self._to_guest.items()}

    def host_name(self, guest_name: str) -> str | None:
        """The host reader a guest's name stands for, or None when the guest cannot see it."""
        host = self._to_host.get(guest_name)
        if host is None:
            host = guest_name
            if host in self._to_guest:  # renamed: its host name is not a name for the guest
                return None
        return host if self._visible(host) else None

    async def before(self, call: Call, session: Session) -> Call:
        if isinstance(call, Connect):
            host = self.host_name(call.reader)
            if host is None:
                raise PCSCError(ReturnCode.SCARD_E_UNKNOWN_READER, call.reader)
            if host != call.reader:
                return replace(call, reader=host)
        return call

    def readers(self, readers: tuple[HostReader, ...]) -> tuple[HostReader, ...]:
        return tuple(
            replace(reader, name=self._to_guest.get(reader.name, reader.name))
            for reader in readers
            if self._visible(reader.name)
        )


class CheckedService:
    """A service whose sessions pass a checkpoint's rules before and after every call."""

    def __init__(self, inner: Service, checkpoint: Checkpoint) -> None:
        self.inner = inner
        self.checkpoint = checkpoint

    def open_session(self, guest: str) -> CheckedSession:
        return CheckedSession(self.inner.open_session(guest), self.checkpoint.rules_for(guest))


class CheckedSession:
    def __init__(self, inner: Session, rules: GuestRules) -> None:
        self.inner = inner
        self.rules = rules
        self.guest = inner.guest

    async def call(self, call: Call) -> Any:
        try:
            return await self.checked_call(call)
        except Answered as answer:
            return answer.result

    async def checked_call(self, call: Call) -> Any:
        """`call`, but a checkpoint's own answer comes as Answered (so that a checkpoint
        wrapping this one sees it as such)."""
        started = time.perf_counter()
        try:
            checked = await self.rules.before(call, self.inner)
            started = time.perf_counter()
            if isinstance(self.inner, CheckedSession):
                result = await self.inner.checked_call(checked)
            else:
                result = await self.inner.call(checked)
        except Answered as answer:
            self._after(call, 0, answer.result, started, answer.reason)
            raise
        except PCSCError as exc:
            self._after(call, exc.rv, None, started, getattr(exc, "reason", ""))
            raise
        except BaseException:
            # Cancelled (the guest went away) or a bug: the hooks still see the call end.
            self._after(call, ReturnCode.SCARD_E_CANCELLED, None, started, "not completed")
            raise
        self._after(checked, 0, result, started, "")
        return result

    def _after(self, call: Call, rv: int, result: Any, started: float, note: str) -> None:
        self.rules.after(call, Outcome(rv, result, time.perf_counter() - started, note))

    async def wait_readers(self, after: int) -> ReaderSnapshot:
        snapshot = await self.inner.wait_readers(after)
        return replace(snapshot, readers=self.rules.readers(snapshot.readers))

    def context_ids(self) -> list[int]:
        return self.inner.context_ids()

    async def aclose(self) -> None:
        """The guest went away: each context it held is released through the rules too."""
        for h_context in self.inner.context_ids():
            # Refused or failed: the inner session releases it below all the same.
            with contextlib.suppress(PCSCError):
                await self.call(ReleaseContext(h_context))
        await self.inner.aclose()
