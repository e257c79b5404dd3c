"""Public keys written in the config (``downlink.public_keys``): checked when it loads."""

from __future__ import annotations

import base64
import binascii

ED25519_KEY_BYTES = 32


def decode_public_key(text: str) -> bytes:
    """The 32 bytes of an Ed25519 public key written as base64 (what `gateway cloud keygen`
    prints); ValueError with the fix when it is none."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64; copy the line `gateway cloud keygen` printed") from None
    if len(raw) != ED25519_KEY_BYTES:
        raise ValueError(f"{len(raw)} bytes, an Ed25519 public key has {ED25519_KEY_BYTES}; "
                         "copy the line `gateway cloud keygen` printed")
    return raw
