"""Provisioning the site broker: a Mosquitto user per device, and the gateway's own user.

deploy/mosquitto-site.conf turns anonymous access off and names a password file and the ACL
file deploy/mosquitto-site.acl, whose patterns give each user named by a device id only that
device's topics. A device is added by writing its user into the password file in the format
Mosquitto 2.0 reads (``$7$``: PBKDF2-SHA512), so no password passes through a command line
(``mosquitto_passwd -b`` would show it in ``ps``). The file is replaced atomically and keeps
its owner and mode; Mosquitto reads it again on SIGHUP (``systemctl reload mosquitto``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway.commands import device_key
from gateway.errors import FieldgateError
from gateway.ingest.decode import valid_device_id

# The gateway's user: deploy/mosquitto-site.acl gives this name the gateway's rights.
GATEWAY_USER = "fieldgate"
DEFAULT_PASSWORD_FILE = Path("/etc/mosquitto/fieldgate.passwd")
# Mosquitto's own default. The passwords are random (192 bits), so guessing one from a
# stolen password file is hopeless at any count; more iterations would only slow every
# CONNECT on a Raspberry Pi.
_ITERATIONS = 101
_SALT_BYTES = 12
# Mosquitto's password file separates user and hash with ':' and drops an entry whose
# name holds one (2.0.11: "Invalid password hash type"), so such a device could never log in.
_BROKER_FORBIDDEN = ":"


@dataclass(frozen=True, slots=True)
class Provisioned:
    """What a device (or the gateway) is told once: its broker password and command key."""

    user: str
    password: str
    command_key: str | None


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = _ITERATIONS) -> str:
    """A password file entry's hash as Mosquitto 2.0 writes it: $7$iter$salt$PBKDF2-SHA512."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def check_device_id(device: str, max_len: int) -> None:
    """FieldgateError (one line) unless ``device`` is a device id that ingest accepts
    (gateway.ingest.decode.valid_device_id) and that can be a Mosquitto user name."""
    problem = valid_device_id(device, max_len)
    if problem is not None:
        raise FieldgateError(f"{problem}: ingest would dead-letter its readings "
                             "(bad_device); see README, \"What goes in and out\"")
    if _BROKER_FORBIDDEN in device:
        raise FieldgateError(f"device id {device!r} has ':', which Mosquitto's password file "
                             "cannot hold in a user name; choose an id without it")


def _users(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise FieldgateError(f"cannot read the password file {str(path)!r}: "
                             f"{err.strerror}") from None


def _write(path: Path, lines: list[str]) -> None:
    """Replace the file atomically, keeping its owner and mode (new: 0640, Mosquitto's
    group reads it)."""
    try:
        st = path.stat()
        mode, owner = st.st_mode & 0o777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o640, None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as err:
        raise FieldgateError(f"cannot write beside {str(path)!r}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("".join(f"{line}\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if owner is not None and os.geteuid() == 0:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise FieldgateError(f"cannot write the password file {str(path)!r}: "
                             f"{err.strerror}") from None


def add_user(path: Path, user: str, *, replace: bool = False) -> str:
    """Add ``user`` with a new random password to the password file; returns the password.
    An existing user is an error unless ``replace`` (then its password changes)."""
    lines = _users(path)
    kept = [line for line in lines if line.split(":", 1)[0] != user]
    if len(kept) != len(lines) and not replace:
        raise FieldgateError(f"{user!r} is already in {str(path)!r}; add --replace to give "
                             "it a new password")
    password = secrets.token_urlsafe(24)
    _write(path, [*kept, f"{user}:{hash_password(password)}"])
    return password


def add_device(path: Path, device: str, master_key: bytes | None, *,
               max_device_id: int, replace: bool = False) -> Provisioned:
    """Provision a device: its broker user (named by its id) and its command key.
    ``max_device_id``: the config's ingest.max_device_id, the longest id ingest takes."""
    check_device_id(device, max_device_id)
    if device == GATEWAY_USER:
        raise FieldgateError(f"{device!r} is the gateway's user on the site broker; "
                             "choose another device id")
    password = add_user(path, device, replace=replace)
    key = None if master_key is None else device_key(master_key, device).decode()
    return Provisioned(device, password, key)


def add_gateway(path: Path, *, replace: bool = False) -> Provisioned:
    """The gateway's own user (the ACL file names it)."""
    return Provisioned(GATEWAY_USER, add_user(path, GATEWAY_USER, replace=replace), None)
