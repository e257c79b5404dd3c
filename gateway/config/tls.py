"""TLS material named by the config: the client context a link connects with, built from
its CA bundle and client certificate; a file that is unusable is a ConfigError naming it."""

from __future__ import annotations

import ssl
from pathlib import Path

from gateway.errors import ConfigError


def client_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None,
                   where: str = "") -> ssl.SSLContext:
    """The context that verifies the server (``ca_file``, else the system trust store) and,
    with both ``cert_file`` and ``key_file``, presents a client certificate. ``where``
    (e.g. ``"cloud."``) prefixes the field in the error line."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError([f"{where}ca_file: {str(ca_file)!r} is not a usable CA "
                           f"bundle ({err})"]) from None
    if cert_file and key_file:
        try:
            # An encrypted key would prompt on a terminal; fail instead.
            context.load_cert_chain(str(cert_file), str(key_file), password=lambda: "")
        except (ssl.SSLError, OSError) as err:
            raise ConfigError([f"{where}cert_file/key_file: {str(cert_file)!r} and "
                               f"{str(key_file)!r} do not make a usable client "
                               f"certificate (unencrypted key expected): {err}"]) from None
    return context
