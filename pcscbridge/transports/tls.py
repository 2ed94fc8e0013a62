"""TLS link endpoints (`tls:HOST:PORT`): mutual, each side pinned to the other's certificate.

Each side has a key and certificate (`pcscbridge keygen`) and the SHA-256 fingerprint of the
other's certificate. Python's ssl module cannot check a certificate against a fingerprint
during the handshake, and a TLS server that asks for a client certificate must verify its
chain to a CA, which a pinned self-signed certificate has not got. A TLS *client* can take the
server's certificate unverified and compare its fingerprint after the handshake, so each
side authenticates as a TLS server once: the guest (the listener) in an outer TLS session,
the host (the dialer) in a second session inside the first. Then both say "accepted" (one
byte, inside both sessions) so that a side whose certificate was refused learns it at once.
Everything fails with a TLSLinkError naming the reason, within HANDSHAKE_TIMEOUT seconds.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio

from ..errors import PeerError, SetupError

PIN_PREFIX = "sha256:"
HANDSHAKE_TIMEOUT = 10.0
ACCEPTED = b"\x01"


class TLSSetupError(SetupError):
    """A TLS key or fingerprint that cannot be used."""


class TLSLinkError(PeerError):
    """The peer failed the TLS handshake or is not the pinned one; the link is closed."""


def fingerprint(der: bytes) -> str:
    return PIN_PREFIX + hashlib.sha256(der).hexdigest()


def parse_fingerprint(text: str) -> str:
    """`sha256:<64 hex digits>` (colons between bytes allowed), normalised."""
    digits = text.removeprefix(PIN_PREFIX).replace(":", "").lower()
    if not text.startswith(PIN_PREFIX) or len(digits) != 64 or not _is_hex(digits):
        raise TLSSetupError(f"bad fingerprint {text!r}: expected sha256:<64 hex digits>")
    return PIN_PREFIX + digits


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def certificate_fingerprint(path: str | Path) -> str:
    """The fingerprint of the (first) certificate in a PEM file."""
    text = Path(path).read_text()
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise TLSSetupError(f"{path} holds no certificate")
    return fingerprint(ssl.PEM_cert_to_DER_cert(text[begin : end + 25]))


@dataclass(frozen=True)
class TLSSettings:
    """Our key (PEM: private key and certificate) and the peer's pinned fingerprint."""

    key_path: str
    peer: str  # sha256:<hex>

    @classmethod
    def load(cls, key_path: str | None, peer: str | None) -> TLSSettings:
        if not key_path or not peer:
            raise TLSSetupError(
                "a tls: endpoint needs --tls-key PATH (ours, from `pcscbridge keygen`) and "
                "--tls-peer sha256:<hex> (the other side's fingerprint)"
            )
        settings = cls(key_path, parse_fingerprint(peer))
        settings.server_context()  # fails now, not at the first connection
        return settings

    @property
    def own_fingerprint(self) -> str:
        return certificate_fingerprint(self.key_path)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            context.load_cert_chain(self.key_path)
        except (OSError, ssl.SSLError) as exc:
            raise TLSSetupError(f"cannot use the TLS key {self.key_path}: {exc}") from None
        return context

    @staticmethod
    def client_context() -> ssl.SSLContext:
        # The certificate is checked against the pin after the handshake (see the module doc).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context


class PinnedTLSStream(trio.abc.Stream):
    """A TLS link stream; the handshakes run at the first use (or `handshake()`), so that a
    listener hands out connections at once and each one's handshake costs only its own task."""

    def __init__(self, transport: trio.abc.Stream, settings: TLSSettings, *, dialer: bool):
        self.settings = settings
        self.dialer = dialer
        self._transport = transport
        self._stream: trio.SSLStream[trio.abc.Stream] | None = None
        self._lock = trio.Lock()
        self.peer_identity: str | None = None  # "tls sha256:...", once authenticated

    async def handshake(self) -> None:
        async with self._lock:
            if self._stream is not None:
                return
            try:
                with trio.move_on_after(HANDSHAKE_TIMEOUT) as waited:
                    self._stream = await self._secure()
                if waited.cancelled_caught:
                    raise TLSLinkError(f"no TLS handshake within {HANDSHAKE_TIMEOUT:.0f} s")
            except BaseException:
                await trio.aclose_forcefully(self._transport)
                raise

    async def _secure(self) -> trio.SSLStream[trio.abc.Stream]:
        settings = self.settings
        if self.dialer:  # outer: we check the listener; inner: it checks us
            outer = await _handshake(self._transport, settings.client_context(), "outer")
            self._check(outer)
            inner = await _handshake(outer, settings.server_context(), "inner", server=True)
        else:
            outer = await _handshake(
                self._transport, settings.server_context(), "outer", server=True
            )
            inner = await _handshake(outer, settings.client_context(), "inner")
            self._check(inner)
        await inner.send_all(ACCEPTED)
        if await _receive_exactly(inner, 1) != ACCEPTED:
            raise TLSLinkError(
                "the peer closed the TLS link after the handshake: it does not accept our "
                f"certificate {settings.own_fingerprint} (check its --tls-peer)"
            )
        self.peer_identity = f"tls {settings.peer}"
        return inner

    def _check(self, stream: trio.SSLStream[trio.abc.Stream]) -> None:
        der = stream.getpeercert(binary_form=True)
        if der is None:
            raise TLSLinkError("the peer sent no certificate")
        got = fingerprint(der)
        if got != self.settings.peer:
            raise TLSLinkError(
                f"the peer's certificate is {got}, not the pinned {self.settings.peer}"
            )

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.handshake()
        assert self._stream is not None
        await self._stream.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self.handshake()
        assert self._stream is not None
        return await self._stream.receive_some(max_bytes)

    async def wait_send_all_might_not_block(self) -> None:
        await self.handshake()
        assert self._stream is not None
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        # Closing TLS politely would wait for the peer; a link that ends just goes.
        await trio.aclose_forcefully(self._transport)


async def _handshake(
    transport: trio.abc.Stream, context: ssl.SSLContext, which: str, *, server: bool = False
) -> trio.SSLStream[trio.abc.Stream]:
    stream = trio.SSLStream(transport, context, server_side=server)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ or exc
        # An EOF in the middle of the handshake is the peer hanging up, whichever side saw it
        # first: one message for both ways it shows.
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLEOFError):
            reason = cause.reason or str(cause)
            raise TLSLinkError(f"TLS handshake ({which}) failed: {reason}") from None
        raise TLSLinkError(
            f"the peer closed the connection during the TLS handshake ({which}): not a TLS "
            "peer, or it does not accept our certificate"
        ) from None
    return stream


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = b""
    try:
        while len(data) < size and (chunk := await stream.receive_some(size - len(data))):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


class PinnedTLSListener(trio.abc.Listener[trio.abc.Stream]):
    """Accepts TCP connections and hands them out as PinnedTLSStreams (not yet handshaken)."""

    def __init__(self, transport: trio.abc.Listener[trio.abc.Stream], settings: TLSSettings):
        self._transport = transport
        self.settings = settings

    async def accept(self) -> PinnedTLSStream:
        return PinnedTLSStream(await self._transport.accept(), self.settings, dialer=False)

    async def aclose(self) -> None:
        await self._transport.aclose()


def keygen(path: str | Path) -> str:
    """Write a new private key and a self-signed certificate (PEM, mode 0600) to `path`;
    return the certificate's fingerprint. Needs the `cryptography` package."""
    import datetime
    import os

    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise TLSSetupError(
            "keygen needs the cryptography package: pip install 'pcscbridge[tls]' "
            "(or make the key elsewhere and copy it)"
        ) from None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pcscbridge")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        # The pin is what is trusted, not a date: "no well-defined expiration" (RFC 5280).
        .not_valid_after(datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + certificate.public_bytes(serialization.Encoding.PEM)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise TLSSetupError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    return fingerprint(certificate.public_bytes(serialization.Encoding.DER))
