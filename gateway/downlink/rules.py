"""Rule bundles from the cloud: checked, stored, run; and rolled back (docs/downlink.md).

The router (gateway.downlink.service) hands a request here once its common checks passed
(size, signature, id and ts, clock skew, replay). ``RuleDeployer.deploy`` checks the body
(``version``, ``files``), every file with the checker `gateway rules check` uses, stores
the bundle atomically (gateway.downlink.versions), makes it current and reloads the running
engine from the stored files; only then is the answer ``applied``. Anything wrong is
``refused`` with a reason (and the ``file:line: ...`` lines for rule mistakes), and then
nothing changed on disk or in the engine. ``rollback`` returns to the version that ran
before the current one.

Each call returns an ``Outcome``: the reply body and the events for the log; the router
commits the events with its replay state and publishes the reply.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.downlink.versions import LOCAL, DeployState, RuleVersions
from gateway.errors import ConfigError
from gateway.records import Event

log = logging.getLogger(__name__)

RECEIVED = "io.fieldgate.rules.received"
APPLIED = "io.fieldgate.rules.applied"
REFUSED = "io.fieldgate.rules.refused"
ROLLED_BACK = "io.fieldgate.rules.rolled_back"
SUBJECT = "rules"

VERSION_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A plain file name: no directory part, not hidden, ending .yaml or .yml.
FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}\.ya?ml")
# Files in one bundle: a site's rules are a handful of files; this bounds the work a bundle
# can ask for (each file is parsed) and the directory it makes.
MAX_BUNDLE_FILES = 64
# Largest file in a bundle, as for a rule file on disk (gateway.rulefiles).
MAX_FILE_BYTES = 1024 * 1024
# Error lines in a reply: enough to fix a bundle, while the reply stays a small message.
MAX_REPLY_ERRORS = 50


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the router logs (``events``, in order) and answers (``reply``, the JSON body)."""

    reply: dict[str, Any]
    events: list[Event] = field(default_factory=list)


class BundleRefusedError(Exception):
    """A bundle or request that is not taken; ``reason`` is the reply's, ``errors`` the
    rule checker's lines."""

    def __init__(self, reason: str, errors: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors = errors


def _name(value: object) -> str:
    """A name from outside, shown safely in a reason (quoted, escaped, cut)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_body(body: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The version and files of a rules/set body; BundleRefusedError saying what is wrong."""
    version = body.get("version")
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise BundleRefusedError("malformed: version must be 1-64 characters from A-Za-z0-9._- "
                            f"(got {_name(version)})")
    if version == LOCAL:
        raise BundleRefusedError(f"malformed: version {LOCAL!r} names the config's own rule "
                            "files; give the bundle another version")
    files = body.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleRefusedError("malformed: files must be a non-empty object of file name -> "
                            "rule file text")
    if len(files) > MAX_BUNDLE_FILES:
        raise BundleRefusedError(f"malformed: {len(files)} files; a bundle holds at most "
                            f"{MAX_BUNDLE_FILES}")
    for name, text in files.items():
        if not FILE_NAME_RE.fullmatch(name):
            raise BundleRefusedError(f"malformed: file name {_name(name)} is not a plain file name "
                                "ending .yaml or .yml (letters, digits, . _ -; no directory)")
        if name.endswith((".test.yaml", ".test.yml")):
            raise BundleRefusedError(f"malformed: {name!r} is a rule test file; tests are run "
                                "before deploying (gateway rules test), not deployed")
        if not isinstance(text, str):
            raise BundleRefusedError(f"malformed: files[{name!r}] must be the file's text")
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            raise BundleRefusedError(f"malformed: files[{name!r}] is not UTF-8 text") from None
        if size > MAX_FILE_BYTES:
            raise BundleRefusedError(f"malformed: {name!r} is larger than "
                                f"{MAX_FILE_BYTES // 1024} KiB; split it into several files")
    return version, files


def check_rules(files: dict[str, str], device_check: Callable[[str], str | None]) -> None:
    """The checker of `gateway rules check` over the bundle's files (in name order, named
    as in the bundle); BundleRefusedError("rule errors") with its lines. ``device_check``:
    the gateway's (gateway.rule_service.device_check)."""
    # Imported here: the engine brings numpy, which a gateway without rules never loads.
    from gateway.engine.rules import RuleSet  # noqa: PLC0415

    rules = RuleSet(device_check=device_check)
    for name in sorted(files):
        rules.add(files[name], name)
    try:
        rules.groups()
    except ConfigError as err:
        raise BundleRefusedError("rule errors", _capped(err.problems)) from None


def _capped(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_REPLY_ERRORS:
        return list(lines)
    return [*lines[:MAX_REPLY_ERRORS - 1],
            f"... and {len(lines) - MAX_REPLY_ERRORS + 1} more"]


class RunningRules(Protocol):
    """What the deployer needs of the running rule engine (gateway.rule_service.RuleService;
    a protocol, so this package does not import the gateway's wiring)."""

    @property
    def versions(self) -> RuleVersions | None:
        """The deployed versions (None: downlink.rules is off)."""

    @property
    def device_check(self) -> Callable[[str], str | None]:
        """What is wrong with a command's device id (ingest's rule)."""

    def install(self) -> object:
        """Load the current version's files into the engine; ConfigError, with the engine
        untouched, when they do not load."""


class RuleDeployer:
    """Deploys and rolls back rule versions for the running engine of ``rules`` (whose
    ``versions`` store it shares). Called from the gateway's loop, like the engine."""

    def __init__(self, rules: RunningRules) -> None:
        if rules.versions is None:
            raise ValueError("RuleDeployer needs downlink.rules on (the rule service then "
                             "keeps the deployed versions)")
        self._rules = rules
        self._versions: RuleVersions = rules.versions

    @property
    def version(self) -> str:
        """The rules version running (``local``: the config's files), for the status."""
        return self._versions.state.running.name

    def deploy(self, request_id: str, body: dict[str, Any], now: float) -> Outcome:
        """Check, store and run a rule bundle; see the module docstring."""
        bundle = body.get("version")
        try:
            version, files = check_body(body)
            check_rules(files, self._rules.device_check)
            return self._apply(request_id, version, files, now)
        except BundleRefusedError as refused:
            return self._refused(request_id, refused, now,
                                 bundle if isinstance(bundle, str) else None)

    def _apply(self, request_id: str, version: str, files: dict[str, str],
               now: float) -> Outcome:
        old = self._versions.state
        try:
            stored = self._versions.store(version, files, request_id, now)
        except OSError as err:
            raise BundleRefusedError(f"cannot store the bundle: {err.strerror}") from None
        try:
            self._versions.commit(old.deployed(stored, request_id, now))
        except OSError as err:
            self._versions.discard(stored)
            raise BundleRefusedError(f"cannot store the bundle: {err.strerror}") from None
        self._run(old)
        self._prune()
        previous = old.running.name
        log.info("Rules version %r deployed by request %r (was %r)", version, request_id,
                 previous)
        return Outcome(
            {"id": request_id, "status": "applied", "version": version, "previous": previous},
            [Event(APPLIED, SUBJECT, now, {"request": request_id, "version": version,
                                           "previous": previous,
                                           "files": sorted(files)})])

    def rollback(self, request_id: str, now: float) -> Outcome:
        """Return to the version that ran before the current one."""
        try:
            return self._roll_back(request_id, now)
        except BundleRefusedError as refused:
            return self._refused(request_id, refused, now, None)

    def _roll_back(self, request_id: str, now: float) -> Outcome:
        old = self._versions.state
        if not old.rollback:
            raise BundleRefusedError(f"nothing to roll back to: version {old.running.name!r} "
                                     "runs and no version ran before it")
        try:
            self._versions.commit(old.rolled_back(request_id, now))
        except OSError as err:
            raise BundleRefusedError(f"cannot store the rollback: {err.strerror}") from None
        self._run(old)
        self._prune()
        version, previous = self.version, old.running.name
        log.info("Rules rolled back to version %r by request %r (was %r)", version,
                 request_id, previous)
        return Outcome(
            {"id": request_id, "status": "rolled_back", "version": version,
             "previous": previous},
            [Event(ROLLED_BACK, SUBJECT, now, {"request": request_id, "version": version,
                                               "previous": previous})])

    def _run(self, old: DeployState) -> None:
        """Load the committed state's version into the engine; when it does not load, put
        ``old`` back on disk (the engine still runs its rules) and refuse."""
        try:
            self._rules.install()
        except ConfigError as err:
            new = self._versions.state
            try:
                self._versions.commit(old)
            except OSError as disk:
                # The disk still names the new version (checked, so a restart loads it);
                # here the old one runs on.
                log.error("Rules version %r did not load and the state could not be put "  # noqa: TRY400
                          "back (%s); the engine keeps its rules", new.running.name,
                          disk.strerror)
                self._versions.state = old
            else:
                if new.current not in old.versions and new.current != 0:
                    self._versions.discard(new.running)
            raise BundleRefusedError("rule errors", _capped(err.problems)) from None

    def _prune(self) -> None:
        try:
            self._versions.prune()
        except OSError as err:
            # Old versions stay on disk until the next change: nothing runs differently.
            log.warning("Old rule versions not pruned: %s", err.strerror)

    def _refused(self, request_id: str, refused: BundleRefusedError, now: float,
                 bundle: str | None) -> Outcome:
        reply: dict[str, Any] = {"id": request_id, "status": "refused",
                                 "reason": refused.reason}
        data: dict[str, Any] = {"request": request_id}
        if bundle is not None and VERSION_RE.fullmatch(bundle):
            data["version"] = bundle
        data["reason"] = refused.reason
        if refused.errors:
            reply["errors"] = refused.errors
            data["errors"] = refused.errors
        reply["version"] = self.version
        data["running"] = self.version
        return Outcome(reply, [Event(REFUSED, SUBJECT, now, data)])
