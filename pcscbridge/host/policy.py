"""The policy checkpoint: what each guest may do with the host's readers (host/policy_file.py
says what the settings are; this module enforces them on every call).

Refusals are PC/SC return codes (`Refused`): a reader the guest may not see,
SCARD_E_UNKNOWN_READER; DIRECT, SCARD_E_SHARING_VIOLATION (as a busy reader); EXCLUSIVE, a
control code or an attribute the policy does not allow, SCARD_W_SECURITY_VIOLATION (what
pcscd answers when polkit refuses access to a card); a
limit reached, SCARD_E_NO_MEMORY (contexts, card handles, as pcscd's own limits) or
SCARD_E_SERVER_TOO_BUSY (calls in flight). A refused APDU is answered by the policy itself
with SW 6982 (security status not satisfied), as a card refuses a command it does not allow.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from ..iso7816 import pin
from ..link.calls import (
    BeginTransaction,
    Call,
    Connect,
    Control,
    Disconnect,
    EndTransaction,
    GetAttrib,
    Ping,
    Reconnect,
    ReleaseContext,
    SetAttrib,
    Transmit,
)
from ..part10 import (
    CM_IOCTL_GET_FEATURE_REQUEST,
    PIN_PAD_FEATURES,
    READ_ONLY_FEATURES,
    parse_features,
    pin_structure_apdu,
    without_features,
)
from ..pcsc import PCSCError, ReturnCode, ShareMode
from .checkpoint import Answered, Outcome, ReaderRules, Refused
from .holds import GuestCard, HoldGuard
from .policy_file import GuestPolicy, PolicyFile
from .readers import HostReader
from .service import Session

log = logging.getLogger("pcscbridge.policy")

SW_DENIED = b"\x69\x82"  # security status not satisfied
_UNCOUNTED = (Ping, ReleaseContext, Disconnect)  # never refused, never limited: clean-up


class Policy:
    """The Checkpoint for a policy file: each guest's rules from its table."""

    def __init__(self, settings: PolicyFile) -> None:
        self.settings = settings
        self._guests: dict[str, _GuestShare] = {}

    def rules_for(self, guest: str) -> GuestPolicyRules:
        share = self._guests.get(guest)
        if share is None:
            share = self._guests[guest] = _GuestShare(self.settings.for_guest(guest))
        return GuestPolicyRules(guest, share)


@dataclass(eq=False)
class _GuestShare:
    """What the sessions of one guest share: its limits count them all."""

    settings: GuestPolicy
    sessions: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    in_flight: int = 0
    cards: int = 0
    rate: _Rate | None = None

    def __post_init__(self) -> None:
        if self.settings.max_apdus_per_second:
            self.rate = _Rate(self.settings.max_apdus_per_second)

    def contexts(self) -> int:
        return sum(len(session.context_ids()) for session in self.sessions)


class _Rate:
    """A token bucket: `per_second` APDUs, bursts of as many; a caller over it waits its turn."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.tokens = float(per_second)
        self.stamp = trio.current_time()

    async def take(self) -> None:
        now = trio.current_time()
        self.tokens = min(self.per_second, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        self.tokens -= 1
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.per_second)


class GuestPolicyRules:
    """One session's rules (GuestRules)."""

    def __init__(self, guest: str, share: _GuestShare) -> None:
        self.guest = guest
        self.share = share
        self.settings = settings = share.settings
        self.reader_rules = ReaderRules(settings.sees, dict(settings.rename))
        self.apdu_rules = settings.apdu_rules
        self.cards: dict[int, GuestCard] = {}
        self.holds = HoldGuard(guest, settings.hold_limit, self.cards)
        self._features: dict[str, dict[int, int]] = {}  # host reader -> feature -> code
        self._session: Session | None = None

    def readers(self, readers: tuple[HostReader, ...]) -> tuple[HostReader, ...]:
        return self.reader_rules.readers(readers)

    # --- before ------------------------------------------------------------------------------
    async def before(self, call: Call, session: Session) -> Call:
        if self._session is None:
            self._session = session
            self.share.sessions.add(session)
        card = self.cards.get(getattr(call, "h_card", -1))
        if card is not None and card.cut:
            return await self._after_cut(call, card, session)
        if isinstance(call, _UNCOUNTED):
            return call
        self.share.in_flight += 1  # after() counts it down, whatever happens here
        if self.share.in_flight > self.settings.max_in_flight:
            raise Refused(
                ReturnCode.SCARD_E_SERVER_TOO_BUSY,
                f"{self.settings.max_in_flight} calls in flight (max_in_flight)",
            )
        if isinstance(call, Connect):
            return await self._connect(call, session)
        if card is None:
            return call  # not a handle of this guest: the service answers INVALID_HANDLE
        match call:
            case Reconnect():
                self._check_share_mode(call.share_mode)
                if call.share_mode == ShareMode.EXCLUSIVE:
                    await self.holds.cooldown(card.reader)
            case BeginTransaction():
                await self.holds.cooldown(card.reader)
            case Transmit():
                await self._transmit(call, card, session)
            case Control():
                return await self._control(call, card, session)
            case GetAttrib() if not self.settings.get_attrib:
                raise Refused(ReturnCode.SCARD_W_SECURITY_VIOLATION, "get_attrib = false")
            case SetAttrib() if not self.settings.set_attrib:
                raise Refused(ReturnCode.SCARD_W_SECURITY_VIOLATION, "set_attrib = false")
        return call

    async def _connect(self, call: Connect, session: Session) -> Call:
        host = None if "\0" in call.reader else self.reader_rules.host_name(call.reader)
        if host is None:
            raise Refused(ReturnCode.SCARD_E_UNKNOWN_READER, "not a reader this guest sees")
        self._check_share_mode(call.share_mode)
        settings = self.settings
        new_context = call.h_context not in session.context_ids()
        if new_context and self.share.contexts() >= settings.max_contexts:
            raise Refused(
                ReturnCode.SCARD_E_NO_MEMORY,
                f"{settings.max_contexts} host contexts open (max_contexts)",
            )
        if self.share.cards >= settings.max_cards:
            raise Refused(
                ReturnCode.SCARD_E_NO_MEMORY, f"{settings.max_cards} card handles (max_cards)"
            )
        if call.share_mode == ShareMode.EXCLUSIVE:
            await self.holds.cooldown(host)
        return replace(call, reader=host) if host != call.reader else call

    async def _after_cut(self, call: Call, card: GuestCard, session: Session) -> Call:
        """A handle cut at the hold limit has no host handle: SCARD_W_RESET_CARD, until the
        guest reconnects (a new host handle under the same name) or disconnects."""
        if isinstance(call, Disconnect):
            raise Answered(None, "card handle already closed at the hold limit")
        if not isinstance(call, Reconnect):
            if not isinstance(call, _UNCOUNTED):
                self.share.in_flight += 1  # after() counts every call but clean-up down
            raise Refused(ReturnCode.SCARD_W_RESET_CARD, "card handle reset at the hold limit")
        self.share.in_flight += 1
        self._check_share_mode(call.share_mode)
        if call.share_mode == ShareMode.EXCLUSIVE:
            await self.holds.cooldown(card.reader)
        return Connect(
            card.h_context, call.h_card, card.reader, call.share_mode, call.preferred_protocols
        )

    def _check_share_mode(self, share_mode: int) -> None:
        if share_mode == ShareMode.DIRECT and not self.settings.direct:
            # As if the reader were busy: OpenSC then asks SHARED instead, and still finds a
            # PIN pad in a reader with a card (a refusal proper ends its search).
            raise Refused(ReturnCode.SCARD_E_SHARING_VIOLATION, "DIRECT (direct = false)")
        if share_mode == ShareMode.EXCLUSIVE and not self.settings.exclusive:
            raise Refused(ReturnCode.SCARD_W_SECURITY_VIOLATION, "EXCLUSIVE (exclusive = false)")

    async def _transmit(self, call: Transmit, card: GuestCard, session: Session) -> None:
        refusal = self.apdu_rules.refusal(call.command)
        if refusal is not None:
            log.info("%s: APDU %s refused: %s", self.guest, pin.header_hex(call.command), refusal)
            raise Answered(SW_DENIED, f"APDU refused: {refusal}")
        if self.share.rate is not None:
            await self.share.rate.take()
        command = call.command
        if len(command) > 5 and command[1] in (pin.VERIFY, pin.CHANGE_REFERENCE_DATA):
            await self._guard_pin(session, call.h_card, call.send_pci_protocol, command, card)

    async def _control(self, call: Control, card: GuestCard, session: Session) -> Call:
        if call.control_code == CM_IOCTL_GET_FEATURE_REQUEST:
            if self.settings.pin_pad:
                return call
            answer = await session.call(call)
            self._features[card.reader] = parse_features(answer)
            raise Answered(without_features(answer, PIN_PAD_FEATURES), "PIN-pad features hidden")
        if call.control_code in self.settings.control_codes:
            return call
        features = await self._reader_features(call.h_card, card, session)
        feature = next((tag for tag, code in features.items() if code == call.control_code), None)
        if feature in READ_ONLY_FEATURES:
            return call
        if feature in PIN_PAD_FEATURES and self.settings.pin_pad:
            header = pin_structure_apdu(feature, call.data)
            if header is not None and header[1] in (pin.VERIFY, pin.CHANGE_REFERENCE_DATA):
                await self._guard_pin(session, call.h_card, card.active_protocol, header, card)
            return call
        what = f"feature 0x{feature:02X}" if feature is not None else "not a listed feature"
        raise Refused(
            ReturnCode.SCARD_W_SECURITY_VIOLATION,
            f"control code 0x{call.control_code:08X} ({what}) not allowed",
        )

    async def _reader_features(
        self, h_card: int, card: GuestCard, session: Session
    ) -> dict[int, int]:
        """The reader's features, asking it once if the guest has not asked yet."""
        features = self._features.get(card.reader)
        if features is None:
            try:
                answer = await session.call(Control(h_card, CM_IOCTL_GET_FEATURE_REQUEST, b""))
            except PCSCError:
                answer = b""
            features = self._features[card.reader] = parse_features(answer)
        return features

    async def _guard_pin(
        self, session: Session, h_card: int, protocol: int, command: bytes, card: GuestCard
    ) -> None:
        """Before a PIN try: ask the card how many are left (VERIFY without data, §11.5.6)
        and refuse the try (SW 6982) when pin_guard or fewer are."""
        limit = self.settings.pin_guard
        if not limit:
            return
        cla, reference = command[0], command[3]
        tries = None
        answer = b""
        if pin.is_interindustry_in_clear(cla):
            probe = bytes([cla, pin.VERIFY, 0x00, reference])
            try:
                answer = await session.call(Transmit(h_card, protocol, probe))
            except PCSCError as exc:
                log.info("%s: PIN guard: asking the tries left failed: %s", self.guest, exc)
            if answer[-2:] == b"\x90\x00":
                log.info("%s: PIN guard: reference %02X already verified", self.guest, reference)
                return
            tries = pin.tries_left(answer)
        where = f"{card.reader}, reference {reference:02X}"
        if tries is None:
            verdict = self.settings.pin_guard_unknown
            log.warning(
                "%s: PIN guard: the card (%s) does not tell the tries left (%s); %s the try "
                "(pin_guard_unknown)",
                self.guest,
                where,
                answer[-2:].hex().upper() or "no answer",
                "refusing" if verdict == "refuse" else "passing",
            )
            if verdict == "refuse":
                raise Answered(SW_DENIED, "PIN guard: the card does not tell the tries left")
            return
        if tries <= limit:
            log.warning(
                "%s: PIN guard: %d tries left (%s), pin_guard = %d: refusing the try",
                self.guest,
                tries,
                where,
                limit,
            )
            raise Answered(SW_DENIED, f"PIN guard: {tries} tries left")
        log.info("%s: PIN guard: %d tries left (%s)", self.guest, tries, where)

    # --- after -------------------------------------------------------------------------------
    def after(self, call: Call, outcome: Outcome) -> None:
        if isinstance(call, _UNCOUNTED):
            self._forget(call)
            return
        self.share.in_flight -= 1
        ok = outcome.rv == 0 and not outcome.note
        card = self.cards.get(getattr(call, "h_card", -1))
        now = trio.current_time()
        match call:
            case Connect() if ok:
                if call.h_card not in self.cards:  # else a cut handle reconnected
                    self.share.cards += 1
                self.cards[call.h_card] = GuestCard(
                    call.h_context,
                    call.reader,
                    call.share_mode,
                    call.preferred_protocols,
                    active_protocol=outcome.result,
                    exclusive_since=now if call.share_mode == ShareMode.EXCLUSIVE else None,
                )
            case Reconnect() if ok and card is not None:
                card.share_mode = call.share_mode
                card.protocols, card.active_protocol = call.preferred_protocols, outcome.result
                exclusive = call.share_mode == ShareMode.EXCLUSIVE
                card.exclusive_since = (card.exclusive_since or now) if exclusive else None
            case BeginTransaction() if ok and card is not None:
                card.transaction_since = now
            case EndTransaction() if card is not None and not card.cut:
                card.transaction_since = None
            case Control() if card is not None and not outcome.note:
                if call.control_code == CM_IOCTL_GET_FEATURE_REQUEST:  # a failure: no features
                    self._features[card.reader] = parse_features(outcome.result or b"")
                return
            case _:
                return
        if self._session is not None:
            self.holds.changed(self._session)

    def _forget(self, call: Call) -> None:
        """Disconnect and ReleaseContext end handles, whatever their outcome."""
        if isinstance(call, Disconnect):
            gone = [call.h_card] if call.h_card in self.cards else []
        elif isinstance(call, ReleaseContext):
            gone = [h for h, card in self.cards.items() if card.h_context == call.h_context]
        else:
            return
        for h_card in gone:
            del self.cards[h_card]
            self.share.cards -= 1
        if gone and self._session is not None:
            self.holds.changed(self._session)
