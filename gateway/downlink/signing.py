"""Signatures of what the cloud sends a gateway: Ed25519 over the exact bytes received.

The cloud signs with a private key that only the operators' tools hold (`gateway cloud
keygen`); a gateway holds only public keys (``downlink.public_keys``). A gateway's disk,
backups or SD card therefore hold nothing that can command any gateway: copying them gives
an attacker the broker credentials, not the right to send commands or rules. (An HMAC key
would have to sit on every gateway, and anyone who read one could sign.)

The signature covers a domain tag, the topic and the payload, exactly as received::

    b"fieldgate-downlink-v1\\n" + topic (UTF-8) + b"\\n" + payload

so a message cannot be moved to another gateway, device or kind of request (the topic names
all three), and nothing is re-serialised: any MQTT client can sign, any gateway can check.
The signature travels in the MQTT v5 user property ``signature`` as ``ed25519:<base64>``.
Response Topic and Correlation Data are not signed: they only say where the answer goes.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from gateway.config.keys import decode_public_key
from gateway.errors import FieldgateError

SIGNATURE_PROPERTY = "signature"
_DOMAIN = b"fieldgate-downlink-v1\n"
_PREFIX = "ed25519:"
_SIG_BYTES = 64


class SigningKeyError(FieldgateError):
    """A signing or public key that cannot be used (one line, naming the file or value)."""


def signed_bytes(topic: str, payload: bytes) -> bytes:
    """What a signature covers."""
    return _DOMAIN + topic.encode() + b"\n" + payload


def public_key_text(key: Ed25519PublicKey) -> str:
    """A public key as it is written in ``downlink.public_keys``: base64 of its 32 bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A key from ``downlink.public_keys``; ValueError with the fix when it is none."""
    return Ed25519PublicKey.from_public_bytes(decode_public_key(text))


class Signer:
    """Signs downlink messages with the cloud's private key (operators' tools only)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls, path: Path) -> Signer:
        """A new key written to ``path`` (PEM, PKCS#8, mode 0600; refuses to overwrite)."""
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SigningKeyError(f"{str(path)!r} exists; a signing key is never overwritten "
                            "(remove it yourself, or choose another path)") from None
        except OSError as err:
            raise SigningKeyError(f"cannot write {str(path)!r}: {err.strerror}") from None
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return cls(key)

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        """The private key in ``path`` (PEM, as `gateway cloud keygen` writes it, or
        `openssl genpkey -algorithm ed25519`)."""
        try:
            data = path.read_bytes()
        except OSError as err:
            raise SigningKeyError(f"cannot read the signing key {str(path)!r}: {err.strerror}") \
                from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise SigningKeyError(f"{str(path)!r} is not an unencrypted PEM private key; make one "
                            "with `gateway cloud keygen`") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{str(path)!r} is not an Ed25519 key; make one with "
                            "`gateway cloud keygen`")
        return cls(key)

    @property
    def public_key(self) -> str:
        return public_key_text(self._key.public_key())

    def sign(self, topic: str, payload: bytes) -> str:
        """The value of the ``signature`` user property for ``payload`` on ``topic``."""
        sig = self._key.sign(signed_bytes(topic, payload))
        return _PREFIX + base64.b64encode(sig).decode()


class Verifier:
    """Checks signatures against the configured public keys (several during a rotation)."""

    def __init__(self, public_keys: list[str]) -> None:
        self._keys = [parse_public_key(k) for k in public_keys]

    def problem(self, topic: str, payload: bytes, value: str | None) -> str | None:
        """None when ``value`` is a good signature of ``payload`` on ``topic`` by one of the
        keys; else the reason it is refused (``unsigned``, ``bad signature``)."""
        if value is None:
            return "unsigned: no 'signature' user property"
        if not value.startswith(_PREFIX):
            return "bad signature: expected 'ed25519:<base64>'"
        try:
            sig = base64.b64decode(value[len(_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            return "bad signature: not base64"
        if len(sig) != _SIG_BYTES:
            return f"bad signature: {len(sig)} bytes, Ed25519 has {_SIG_BYTES}"
        message = signed_bytes(topic, payload)
        for key in self._keys:
            try:
                key.verify(sig, message)
            except InvalidSignature:
                continue
            return None
        return "bad signature: not made by a key in downlink.public_keys for this topic " \
               "and payload"
