"""ISO/IEC 7816 byte formats, pure (bytes in, values out; no I/O, no PC/SC state).

- :mod:`.atr`: the Answer-to-Reset of ISO 7816-3 (TS, T0, interface bytes per level, historical
  bytes, TCK) and the protocols it offers;
- :mod:`.apdu`: command APDUs of ISO 7816-4 (cases 1 to 4, short and extended lengths).
"""
