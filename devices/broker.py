"""Where the emulator's MQTT goes: a broker URL, checked once for every command."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Broker:
    host: str
    port: int
    tls: ssl.SSLContext | None


def broker(url_text: str, *, ca_file: str | None = None, username: str | None = None,
           password: bytes | None = None) -> Broker:
    """``mqtt://host:port`` or ``mqtts://host:port`` (checked against ``ca_file``, else the
    system's CAs); ValueError with one line naming the mistake."""
    url = urlsplit(url_text)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        raise ValueError(f"{url_text!r}: write mqtt://host:port or mqtts://host:port")
    try:
        port = url.port or (8883 if url.scheme == "mqtts" else 1883)
    except ValueError:
        raise ValueError(f"{url_text!r}: the port is not a number 1-65535") from None
    if ca_file is not None and url.scheme != "mqtts":
        raise ValueError(f"a CA file needs an mqtts:// broker, not {url_text!r}")
    if password is not None and username is None:
        raise ValueError("a password needs a username")
    tls = ssl.create_default_context(cafile=ca_file) if url.scheme == "mqtts" else None
    return Broker(url.hostname, port, tls)
