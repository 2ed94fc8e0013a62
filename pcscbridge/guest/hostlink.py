"""The guest's side of the link: which host is attached, calls to it, and its reader pushes."""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any

import trio

from ..errors import PeerError
from ..link.calls import BadResult, CardCall, Connect, Ping, ReleaseContext
from ..link.endpoint import LinkClosed, LinkEndpoint, LinkLimits, MessageTooLarge
from ..link.protocol import READERS_TOPIC, Push, Request, Response, decode_readers
from ..pcsc import PCSCError, ReturnCode
from ..transports.peers import link_identity
from .mirror import ReaderMirror

log = logging.getLogger("pcscbridge.guest")

LINK_KEEPALIVE = 5.0  # seconds between pings to the host; silent for twice that: link dropped


class LinkRefused(PeerError):
    """A second link that does not authenticate as the attached host."""


class HostLink:
    """At most one host is attached at a time. A new link replaces the attached one only when
    both authenticate as the same host (the pinned TLS peer, or the same uid on the UNIX
    socket); an unauthenticated link (TCP, stdio) never replaces one, so a local impostor
    cannot take the link over. Every change of link starts a new generation: card handles
    opened on an older one are gone (the host released them)."""

    def __init__(
        self,
        mirror: ReaderMirror,
        *,
        keepalive: float | None = LINK_KEEPALIVE,
        limits: LinkLimits | None = None,
    ) -> None:
        self.mirror = mirror
        self.keepalive = keepalive
        self.limits = limits
        self.generation = 0
        self.readers_pushed = trio.Event()  # the attached host has sent its readers
        self._endpoint: LinkEndpoint | None = None
        self._identity: str | None = None  # what the attached link authenticated as
        self._contexts_on_link: set[int] = set()  # guest contexts the host knows
        self._numbers = itertools.count(1)

    def statistics(self) -> dict[str, object]:
        endpoint = self._endpoint
        return {
            "attached": endpoint is not None,
            "generation": self.generation,
            "contexts_on_link": len(self._contexts_on_link),
            **(endpoint.statistics() if endpoint is not None else {}),
        }

    @property
    def endpoint(self) -> LinkEndpoint | None:
        """The attached host's link, if one is."""
        return self._endpoint

    # --- calls ------------------------------------------------------------------------------
    async def connect(self, call: Connect) -> int:
        """SCardConnect on the host; the result is the active protocol."""
        self._contexts_on_link.add(call.h_context)
        result: int = await self._call(call)
        return result

    async def card_call(self, call: CardCall) -> Any:
        """A call on a card handle; its typed result."""
        return await self._call(call)

    async def release_context(self, h_context: int) -> None:
        """Tell the host to release what the context holds, if the host knows the context.
        Failures only matter to the log: the context is gone here in any case."""
        if h_context not in self._contexts_on_link:
            return
        self._contexts_on_link.discard(h_context)
        endpoint = self._endpoint
        if endpoint is None:
            return
        # Posted, not awaited: the host answers a release at once anyway and runs it after the
        # context's calls under way, and nothing the client sees depends on its outcome, so
        # SCardReleaseContext costs no round trip (protocol/link.md).
        with contextlib.suppress(LinkClosed):
            await endpoint.post(ReleaseContext(h_context))

    async def _call(self, call: Connect | CardCall | ReleaseContext) -> Any:
        """No host, or a lost one: the reader is gone."""
        endpoint = self._endpoint
        if endpoint is None:
            raise PCSCError(ReturnCode.SCARD_E_READER_UNAVAILABLE, "no host attached")
        try:
            response = await endpoint.call(call)
        except LinkClosed:
            raise PCSCError(ReturnCode.SCARD_E_READER_UNAVAILABLE, "host link lost") from None
        except MessageTooLarge as exc:
            raise PCSCError(ReturnCode.SCARD_E_INSUFFICIENT_BUFFER, str(exc)) from None
        if response.rv != ReturnCode.SCARD_S_SUCCESS:
            raise PCSCError(response.rv, result=self._out_value(call, response.result))
        try:
            return call.decode_result(response.result)
        except BadResult as exc:
            log.warning("host link: %s; closing it", exc)
            await endpoint.aclose()
            raise PCSCError(ReturnCode.SCARD_E_READER_UNAVAILABLE, "host link closed") from None

    @staticmethod
    def _out_value(call: Connect | CardCall | ReleaseContext, result: list[Any] | None) -> Any:
        """What a failed call reported all the same, if it is of the call's result type."""
        if not result:
            return None
        try:
            return call.decode_result(result)
        except BadResult:
            return None

    # --- attaching --------------------------------------------------------------------------
    async def attach(self, stream: trio.abc.Stream) -> None:
        """Serve one host link until it ends; it replaces the attached one if it
        authenticates as the same host, else it is refused."""
        name = f"host link #{next(self._numbers)}"
        async with trio.open_nursery() as nursery:

            def adopt(_: object) -> None:
                # At the hello, before the link's first push is applied: the mirror must show
                # the new host's readers, never be cleared after them. By now the transport
                # has authenticated the peer (TLS handshakes run before the hello).
                identity = link_identity(stream)
                previous = self._endpoint
                if previous is not None:
                    if identity is None or identity != self._identity:
                        raise LinkRefused(
                            f"refused: a host is attached ({self._identity or 'unauthenticated'})"
                            f" and this link ({identity or 'unauthenticated'}) does not "
                            "authenticate as the same host"
                        )
                    log.warning("the host attached again (%s); dropping its previous link", name)
                    self._lost(previous)
                    nursery.start_soon(previous.aclose)
                self._endpoint = endpoint
                self._identity = identity
                self.generation += 1

            endpoint = LinkEndpoint(
                stream,
                "guest",
                on_push=lambda push: self._on_push(endpoint, push),
                on_hello=adopt,
                on_request=_answer_pings,
                peer_name=name,
                keepalive=self.keepalive,
                ping_any_peer=True,  # every host answers pings
                limits=self.limits,
            )
            await endpoint.run()
        self._lost(endpoint)

    def _lost(self, endpoint: LinkEndpoint) -> None:
        if self._endpoint is not endpoint:
            return
        self._endpoint = None
        self.generation += 1  # every handle opened on the old link is now stale
        self._contexts_on_link.clear()
        self.readers_pushed = trio.Event()
        self.mirror.clear()
        log.warning("host link lost: readers removed until a host attaches again")

    async def _on_push(self, endpoint: LinkEndpoint, push: Push) -> None:
        if endpoint is not self._endpoint:
            return  # a replaced link's last words
        if push.topic != READERS_TOPIC:
            log.debug("ignoring push %r", push.topic)
            return
        self.mirror.update(decode_readers(push))  # LinkProtocolError closes the link
        self.readers_pushed.set()


async def _answer_pings(request: Request) -> Response:
    """The host's keepalive; a host has no other call to make on a guest."""
    if isinstance(request.call, Ping):
        return Response(request.id, ReturnCode.SCARD_S_SUCCESS, [])
    log.warning("the host asked the guest for %r; refused", request.call)
    return Response(request.id, ReturnCode.SCARD_E_UNSUPPORTED_FEATURE)
