"""QEMU's VSCard protocol (ccid-card-passthru's chardev), pure: bytes in, messages out.

The spec is /work/shared/spec/vscard-protocol.md's content as summarised in
protocol/vscard-t0.md; :mod:`.codec` holds the messages, their encoding and a decoder that
refuses what is not the protocol. What a front-end accepts when (the handshake, no APDU before
an ATR) is the front-end's rule (pcscbridge/qemu/).
"""
