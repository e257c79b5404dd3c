"""Broker and server addresses in the config: URLs and ``host:port`` values checked, and
URLs printed without what may hold a secret.

The checks raise ``ValueError`` with one line saying the fix: pydantic turns that into a
field's validation error, and ``metrics.serve`` wraps it for the ``metrics.listen`` it binds.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit, urlunsplit

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$")
_MQTT_EXAMPLE = "write e.g. mqtt://127.0.0.1:1883 or mqtts://broker.example.com:8883"


def check_host(host: str) -> bool:
    """A DNS name or an IP address (IPv6 without brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOSTNAME.match(host))
    return True


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address: traffic that never leaves this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_url(url: str) -> str:
    """``url`` without what may hold a secret (user:password, query string, fragment), for
    error lines and logs."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def split_host_port(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9108"`` / ``"[::1]:9108"`` -> (host, port); ValueError saying the fix."""
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    example = "write host:port, e.g. 127.0.0.1:9108 or [::1]:9108"
    if not sep or not host:
        raise ValueError(f"{value!r} is not host:port; {example}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r} has port {port_text!r}, not 1-65535; {example}")
    if not check_host(host):
        raise ValueError(f"{value!r} has host {host!r}, not a host name or IP address; {example}")
    return host, int(port_text)


def check_mqtt_url(value: str) -> str:
    """A broker URL, ``mqtt://host[:port]`` or ``mqtts://host[:port]``; ValueError saying the
    fix, never echoing credentials or a query string."""
    parts = urlsplit(value)
    if "@" in parts.netloc:
        raise ValueError(
            "credentials in the URL are not accepted; use username and password_file"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"{public_url(value)!r} has a query string or fragment, which "
                         f"MQTT has no use for; use username and password_file; {_MQTT_EXAMPLE}")
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{value!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host; {_MQTT_EXAMPLE}")
    if not check_host(parts.hostname):
        raise ValueError(f"{value!r}: {parts.hostname!r} is not a host name or IP address; "
                         f"{_MQTT_EXAMPLE}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{value!r} has a port outside 1-65535 (leave it out for the "
                         f"default 1883/8883); {_MQTT_EXAMPLE}")
    if parts.path not in ("", "/"):
        raise ValueError(f"{value!r} has a path, which MQTT has no use for; {_MQTT_EXAMPLE}")
    return value


def check_http_url(value: str) -> str:
    """An InfluxDB base URL, ``http(s)://host:port``, returned without a trailing slash;
    ValueError saying the fix, never echoing credentials or a query string."""
    parts = urlsplit(value)
    if "@" in parts.netloc:
        raise ValueError("credentials in the URL are not accepted; use username and "
                         "password_file (v1) or token_file (v2)")
    if parts.query or parts.fragment:
        raise ValueError(f"{public_url(value)!r} has a query string or fragment, which "
                         "has no place in the base URL (a secret there would show in "
                         "logs); use username and password_file (v1) or token_file (v2)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} must be http://host:port or https://host:port")
    try:
        _ = parts.port
    except ValueError as err:
        raise ValueError(f"{value!r} has a bad port") from err
    return value.rstrip("/")
