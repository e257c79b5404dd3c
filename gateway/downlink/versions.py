"""Rule versions deployed from the cloud, kept on disk beside the log.

Layout under ``downlink.rules_path(log.path)``::

    state.json                 which version runs, the rollback stack, the history
    versions/0003-2026-11-29.1/north.yaml ...   one directory per stored bundle

A bundle's directory is written under a temporary name, every file fsynced, then renamed
into place; only then is ``state.json`` replaced (write a temporary file, fsync,
``os.replace``, fsync the directory). A crash at any point leaves either the old state or
the new one, never a pointer to half a bundle; a directory no state names is removed at
the next start.

Version number 0 is ``local``: the rule files the config's ``rules:`` globs name. The
rollback stack holds the versions that ran before the current one, newest last, so
rolling back twice goes two versions back. At most ``MAX_KEPT_VERSIONS`` directories are
kept; the current one and those on the rollback stack are never removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from gateway.errors import ConfigError

LOCAL = "local"
STATE_FILE = "state.json"
VERSIONS_DIR = "versions"
FORMAT = 1
# Bundle directories kept on disk (the running one and the rollback stack included): each is
# a few kilobytes of YAML; more means rolling back further, at that much disk each.
MAX_KEPT_VERSIONS = 20
# History lines kept in state.json (deploys and rollbacks): months of changes at a few a day,
# while the file stays small enough to rewrite on every change.
MAX_HISTORY = 200
_DIR_RE = re.compile(r"(\d{4,})-[A-Za-z0-9._-]+")


class Action(StrEnum):
    """How a version came to run."""

    DEPLOYED = "deployed"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True, slots=True)
class Version:
    """One stored bundle (n > 0), or ``local`` (n == 0: the config's rule files)."""

    n: int
    name: str
    files: tuple[str, ...] = ()
    stored: float = 0.0          # epoch seconds the bundle was written
    request: str = ""            # the cloud request that brought it

    @property
    def dir_name(self) -> str:
        return f"{self.n:04d}-{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.name, "files": list(self.files), "stored": self.stored,
                "request": self.request}


LOCAL_VERSION = Version(0, LOCAL)


@dataclass(frozen=True, slots=True)
class Applied:
    """One line of history: a version started running."""

    time: float
    action: Action
    n: int
    version: str
    previous: str
    request: str
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time, "action": self.action.value, "n": self.n,
                "version": self.version, "previous": self.previous,
                "request": self.request, "files": list(self.files)}


@dataclass(frozen=True, slots=True)
class DeployState:
    """What runs, what it rolls back to, what is stored, what happened. Immutable: a change
    is a new state, written whole."""

    current: int = 0
    rollback: tuple[int, ...] = ()          # versions that ran before, oldest first
    versions: Mapping[int, Version] = field(default_factory=dict)
    history: tuple[Applied, ...] = ()
    next: int = 1

    def version(self, n: int) -> Version:
        return LOCAL_VERSION if n == 0 else self.versions[n]

    @property
    def running(self) -> Version:
        return self.version(self.current)

    def deployed(self, new: Version, request: str, now: float) -> DeployState:
        """This state after ``new`` (stored, numbered ``self.next``) started running."""
        stack = (*self.rollback, self.current)[-(MAX_KEPT_VERSIONS - 1):]
        line = Applied(now, Action.DEPLOYED, new.n, new.name, self.running.name, request,
                       new.files)
        return replace(self, current=new.n, rollback=stack,
                       versions={**self.versions, new.n: new},
                       history=(*self.history, line)[-MAX_HISTORY:], next=new.n + 1)

    def rolled_back(self, request: str, now: float) -> DeployState:
        """This state after returning to the top of the rollback stack (which must not be
        empty)."""
        back = self.version(self.rollback[-1])
        line = Applied(now, Action.ROLLED_BACK, back.n, back.name, self.running.name,
                       request, back.files)
        return replace(self, current=back.n, rollback=self.rollback[:-1],
                       history=(*self.history, line)[-MAX_HISTORY:])

    def kept(self) -> DeployState:
        """This state with only the versions it keeps: the running one, the rollback stack,
        then the newest others, ``MAX_KEPT_VERSIONS`` in all."""
        keep = {self.current, *self.rollback} - {0}
        for n in sorted(self.versions, reverse=True):
            if len(keep) >= MAX_KEPT_VERSIONS:
                break
            keep.add(n)
        return replace(self, versions={n: v for n, v in self.versions.items() if n in keep})

    def to_json(self) -> bytes:
        return orjson.dumps({
            "format": FORMAT, "current": self.current, "rollback": list(self.rollback),
            "next": self.next,
            "versions": {str(n): v.to_dict() for n, v in sorted(self.versions.items())},
            "history": [a.to_dict() for a in self.history]}, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, raw: bytes) -> DeployState:
        """ValueError (KeyError, TypeError) on anything that is not a state we wrote."""
        data = orjson.loads(raw)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a format {FORMAT} state file")
        versions = {int(n): Version(int(n), str(v["version"]), tuple(map(str, v["files"])),
                                    float(v["stored"]), str(v["request"]))
                    for n, v in data["versions"].items()}
        history = tuple(Applied(float(a["time"]), Action(a["action"]), int(a["n"]),
                                str(a["version"]), str(a["previous"]), str(a["request"]),
                                tuple(map(str, a["files"]))) for a in data["history"])
        state = cls(current=int(data["current"]),
                    rollback=tuple(int(n) for n in data["rollback"]),
                    versions=versions, history=history, next=int(data["next"]))
        for n in (state.current, *state.rollback):
            if n != 0 and n not in versions:
                raise ValueError(f"version number {n} is named but not stored")
        if any(n <= 0 or n >= state.next for n in versions):
            raise ValueError("version numbers out of order")
        if any(not _DIR_RE.fullmatch(v.dir_name) for v in versions.values()):
            raise ValueError("a version name is not a plain name")
        return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(root: Path) -> DeployState | None:
    """The state kept under ``root`` (None when nothing was ever deployed there), read
    without writing or locking anything: the CLI reads it while the gateway runs. A state
    file that is not one is a ConfigError naming it."""
    path = root / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read the deployed rules state ({err.strerror})"]
                          ) from None
    try:
        return DeployState.from_json(raw)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError([
            f"{path}: not a deployed rules state ({err}); set downlink.rules: false to run "
            "the config's rule files, or move the file aside to start over from them"]
        ) from None


class RuleVersions:
    """The versions stored under ``root`` and the state that says which runs. Only the
    running gateway writes here (its pid lock keeps a second one out)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = read_state(root) or DeployState()
        self._clean()

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    def paths(self, version: Version) -> list[Path]:
        """The files of a stored version, in name order (the order they are loaded in)."""
        return self.files_of(self.root, version)

    @staticmethod
    def files_of(root: Path, version: Version) -> list[Path]:
        """The files of a version stored under ``root`` (read-only callers: the CLI)."""
        folder = root / VERSIONS_DIR / version.dir_name
        return [folder / name for name in sorted(version.files)]

    def store(self, name: str, files: Mapping[str, str], request: str, now: float) -> Version:
        """Write a bundle into its own directory (atomically: all files or none); it is
        not running until a state naming it is committed. OSError when the disk says no."""
        if not _DIR_RE.fullmatch(f"0000-{name}") or any(
                "/" in f or "\0" in f or f.startswith(".") for f in files):
            raise ValueError("a version or file name is not a plain name")  # checked before
        version = Version(self.state.next, name, tuple(sorted(files)), now, request)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        final = self.versions_dir / version.dir_name
        tmp = self.versions_dir / f".tmp-{version.dir_name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            for file, text in files.items():
                _write_synced(tmp / file, text.encode())
            _fsync_dir(tmp)
            # A directory left by a write that never got its state committed: not named by
            # any state (its number is not below `next`), so it is ours to replace.
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            _fsync_dir(self.versions_dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version

    def commit(self, state: DeployState) -> None:
        """Make ``state`` the one on disk (atomically) and here. OSError when the disk says
        no; the state on disk is then the old one."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp")
        try:
            _write_synced(tmp, state.to_json())
            os.replace(tmp, path)
            _fsync_dir(self.root)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self.state = state

    def discard(self, version: Version) -> None:
        """Remove a stored version no state names (a bundle whose load failed)."""
        shutil.rmtree(self.versions_dir / version.dir_name, ignore_errors=True)

    def prune(self) -> None:
        """Keep at most MAX_KEPT_VERSIONS stored versions (never the running one nor those
        on the rollback stack); the state is committed before directories go."""
        kept = self.state.kept()
        if len(kept.versions) != len(self.state.versions):
            self.commit(kept)
        self._clean()

    def _clean(self) -> None:
        """Remove directories no state names: temporary ones and pruned ones."""
        named = {v.dir_name for v in self.state.versions.values()}
        try:
            entries = list(self.versions_dir.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name not in named and (entry.name.startswith(".tmp-")
                                            or _DIR_RE.fullmatch(entry.name)):
                with contextlib.suppress(OSError):
                    shutil.rmtree(entry)
