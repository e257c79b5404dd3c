"""The rule engine in the running gateway: durable readings in, events and commands out.

Readings reach the engine only after they are durable; every ``engine.tick`` interval the
rules are evaluated, alert/device events go into the log (and so to the uplink) and rule
actions go out as signed commands. Alert state is saved with the log after every tick that
changed an alert, and at shutdown, so a restart neither re-fires a firing alert nor forgets
it (a pending `for:` timer that had not fired yet starts again). SIGHUP reloads the rule files;
a file with a mistake leaves the running rules in place.

Which files run: the config's ``rules:`` globs (the version called ``local``), unless
``downlink.rules`` is on and a version deployed from the cloud is current
(gateway.downlink.versions): then that version's files run instead, at start too, and
SIGHUP re-reads them.
"""

from __future__ import annotations

import fnmatch
import functools
import gc
import logging
import time
from pathlib import Path

import orjson

from gateway.commands import REJECTED, CommandDeviceError, CommandSender, Prepared
from gateway.config import GatewayConfig, Ingest
from gateway.downlink.versions import LOCAL, RuleVersions, read_state
from gateway.engine import CommandEvent, Engine, EngineConfig, ReloadReport
from gateway.engine.rules import DeviceCheck, Group
from gateway.errors import ConfigError
from gateway.ingest.decode import valid_device_id
from gateway.log.store import LogStore
from gateway.metrics import GatewayMetrics
from gateway.records import Event, Reading
from gateway.rulefiles import load_rule_files, load_rule_globs

log = logging.getLogger(__name__)

STATE_NAME = "engine"
DEFAULT_MAX_DEVICE_ID: int = Ingest.model_fields["max_device_id"].default


def device_check(max_device_id: int = DEFAULT_MAX_DEVICE_ID) -> DeviceCheck:
    """Ingest's device id rule, for the devices rule commands are sent to."""
    return functools.partial(valid_device_id, max_len=max_device_id)


def load_groups(patterns: list[str], *,
                max_device_id: int = DEFAULT_MAX_DEVICE_ID) -> list[Group]:
    """Rule groups from the files the config's globs name (sorted); a glob matching nothing
    is a problem too, and so is a command device that does not render to a device id of at
    most ``max_device_id`` characters. Raises ConfigError with every problem found."""
    return load_rule_globs(patterns, device_check=device_check(max_device_id))


class RuleService:
    def __init__(self, cfg: GatewayConfig, store: LogStore, commands: CommandSender,
                 metrics: GatewayMetrics) -> None:
        self._cfg = cfg
        self._store = store
        self._commands = commands
        self._metrics = metrics
        self.device_check = device_check(cfg.ingest.max_device_id)
        # The versions deployed from the cloud, when the config takes them (None: only the
        # config's own files run).
        self.versions: RuleVersions | None = None
        root = cfg.downlink.rules_path(cfg.log.path)
        if cfg.downlink.rules:
            self.versions = RuleVersions(root)
        else:
            self._note_ignored(root)
        groups = self._load()
        self.engine = Engine(groups, config=EngineConfig(
            late_tolerance=cfg.engine.late_tolerance, offline_after=cfg.engine.offline_after,
            max_devices=cfg.engine.max_devices))
        saved = store.load_state(STATE_NAME)
        if saved is not None:
            try:
                dropped = self.engine.restore(orjson.loads(saved), time.time())
            except (ValueError, KeyError, TypeError) as err:
                log.warning("Saved alert state unreadable (%s); starting with none", err)
            else:
                if dropped:
                    log.info("Alert state of changed rules not restored: %s", ", ".join(dropped))
        self._next_tick = 0.0
        self._known: set[str] = set()
        # /metrics is served from another thread: it reads what the loop published after
        # its last tick (a reference swap), never the engine's arrays while they change.
        self._firing = 0
        self._published_drops: dict[str, int] = {}
        self._publish()
        metrics.alerts_firing.set_function(lambda: self._firing)
        metrics.watch_engine(lambda: self._published_drops)

    @property
    def version(self) -> str:
        """The name of the rules version running: ``local`` or a deployed one."""
        return LOCAL if self.versions is None else self.versions.state.running.name

    def _note_ignored(self, root: Path) -> None:
        try:
            state = read_state(root)
        except ConfigError:
            state = None
        if state is not None and state.current != 0:
            log.warning("Rules version %r deployed from the cloud is not run: downlink.rules "
                        "is off; running the config's rule files", state.running.name)

    def _load(self) -> list[Group]:
        """The groups of the version that should run; ConfigError with every problem."""
        check = self._cfg.ingest.max_device_id
        if self.versions is None or self.versions.state.current == 0:
            return load_groups(self._cfg.rules, max_device_id=check)
        version = self.versions.state.running
        try:
            return load_rule_files(list(self.versions.paths(version)),
                                   device_check=self.device_check)
        except ConfigError as err:
            raise ConfigError([
                f"rules version {version.name!r} (deployed by request {version.request!r}, "
                f"in {self.versions.versions_dir / version.dir_name}) cannot be loaded; roll "
                "it back from the cloud, or set downlink.rules: false to run the config's "
                "rule files", *err.problems]) from None

    def install(self) -> ReloadReport:
        """Load the version that should run now into the engine (the alert state of rules
        that did not change is kept) and save the state. ConfigError, with the running rules
        untouched, when its files do not load."""
        report = self.engine.reload(self._load())
        if gc.get_freeze_count():
            # The daemon froze what start-up built (gc.freeze: never collected). What the
            # old rules held may be cyclic garbage now: let a full collection have it, then
            # freeze what lives on.
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        log.info("Rules reloaded (version %r): %s", self.version, report)
        self.save()
        return report

    def _publish(self) -> None:
        self._firing = len(self.engine.firing())
        self._published_drops = self._drops()

    def _drops(self) -> dict[str, int]:
        drops = self.engine.drops
        return {"late": drops.late, "future": drops.future, "unused": drops.unused,
                "duplicate": drops.duplicate,
                "too_many_devices": self.engine.dropped_devices}

    def on_readings(self, readings: list[Reading]) -> None:
        if self._cfg.device_labels:
            for device, _, _ in readings:
                if device not in self._known:
                    self._label(device)
        self.engine.ingest(self.engine.batch(readings), time.time())

    def _label(self, device: str) -> None:
        labels: dict[str, str] = {}
        for pattern, values in self._cfg.device_labels.items():
            if fnmatch.fnmatchcase(device, pattern):
                labels.update(values)
        if labels:
            self.engine.set_device_labels(device, labels)
        if len(self._known) < self._cfg.engine.max_devices:
            self._known.add(device)

    def next_wake(self, now: float) -> float:
        return max(0.0, self._next_tick - now)

    def step(self, now: float) -> None:
        if now < self._next_tick:
            return
        # On a steady grid: a turn of the loop that came late does not push every later
        # tick back (after a stall of more than a tick, the grid restarts from now).
        tick = self._cfg.engine.tick
        self._next_tick = self._next_tick + tick if now - self._next_tick < tick else now + tick
        events = self.engine.tick(time.time())
        self._publish()
        if not events:
            return
        logged: list[Event] = []
        commands: list[Prepared] = []
        for event in events:
            if isinstance(event, CommandEvent):
                # The engine's order in the log: the alert, then the command it caused.
                cause = {"group": event.group, "rule": event.rule,
                         "trigger": str(event.trigger), "device": event.source_device}
                try:
                    command = self._commands.prepare(event.device, event.action,
                                                     dict(event.params), cause=cause)
                except CommandDeviceError as err:
                    # A template that rendered to no device id (e.g. from a label): logged
                    # as refused; the daemon goes on.
                    logged.append(Event(REJECTED, event.source_device, event.time, {
                        "device": event.device, "action": event.action,
                        "reason": err.reason, "cause": cause}))
                    continue
                logged.extend(command.events)
                commands.append(command)
            else:
                logged.append(Event(event.cloud_type, event.device, event.time,
                                    event.to_dict()))
        # One commit for the events, the alert states and the waiting commands: a crash
        # keeps all or none, so an alert never fires twice nor its command goes out twice.
        self._store.append_events_with_state(logged, [self._state(),
                                                      self._commands.state()])
        # Published after the commit (even when the disk is full: actuation comes first).
        for command in commands:
            self._commands.publish(command)
        self._metrics.rule_events.inc(len(events))

    def _state(self) -> tuple[str, bytes]:
        return STATE_NAME, orjson.dumps(self.engine.snapshot())

    def save(self) -> None:
        self._store.append_events_with_state((), [self._state()])

    def reload(self) -> None:
        """SIGHUP: re-read the running version's files (the config's, or the deployed
        version's while one is current)."""
        try:
            self.install()
        except ConfigError as err:
            log.error("Rule reload failed, keeping the running rules: %s", err)  # noqa: TRY400
