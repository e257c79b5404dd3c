"""Rule files on disk: the globs, reads and test-file lookups the pure engine leaves out.

The engine (gateway.engine) takes rule text plus a source name; everything that touches
the file system is here. A file is read without blocking (a FIFO or a device is refused,
not waited on), at most ``MAX_RULE_FILE_BYTES``, and must be UTF-8; each failure is one
``ConfigError`` line naming the file.
"""

from __future__ import annotations

import glob
import os
import stat
from pathlib import Path

from gateway.engine.rules import DeviceCheck, Group, RuleSet
from gateway.engine.ruletest import RuleTestFile, RuleTestResult, parse_test_file, run_tests
from gateway.errors import ConfigError

# Largest rule file read: a rule file is a few kilobytes; this bounds parsing memory.
MAX_RULE_FILE_BYTES = 1024 * 1024


def read_rule_text(path: str | Path) -> str:
    """A rule file's text; ConfigError (one line, with the line number) when it is not
    readable, too large or not UTF-8."""
    try:
        # Opened without blocking and checked on the open file: a FIFO would block the open
        # or the read forever, a device never end; a symlink to a regular file is fine.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError([f"{path}: not a regular file"])
            raw = fh.read(MAX_RULE_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read rule file ({exc.strerror})"]) from None
    if len(raw) > MAX_RULE_FILE_BYTES:
        raise ConfigError([f"{path}: rule file larger than {MAX_RULE_FILE_BYTES // 1024} KiB; "
                           "split it into several files"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                           "save the file as UTF-8"]) from None


def read_rule_files(paths: list[str | Path], *, device_check: DeviceCheck | None = None,
                    ) -> tuple[RuleSet, dict[str, str]]:
    """Read files into a RuleSet (``groups()`` then checks them all), and their texts by
    path; an unreadable file is one of the set's problems."""
    rules = RuleSet(device_check=device_check)
    texts: dict[str, str] = {}
    for path in paths:
        try:
            text = read_rule_text(path)
        except ConfigError as exc:
            rules.add_problems(exc.problems)
            continue
        rules.add(text, str(path))
        texts[str(path)] = text
    return rules, texts


def load_rule_files(paths: list[str | Path], *,
                    device_check: DeviceCheck | None = None) -> list[Group]:
    """Read and check files; group names must be unique across all of them, and every
    problem (unreadable file, mistake, repeated group) is reported in file order.
    ``device_check``: as for gateway.engine.parse_rule_file."""
    return read_rule_files(paths, device_check=device_check)[0].groups()


def load_rule_globs(patterns: list[str], *,
                    device_check: DeviceCheck | None = None) -> list[Group]:
    """Rule groups from the files the globs name (sorted, test files left out); a glob
    matching nothing is a problem too. Raises ConfigError with every problem found."""
    paths: list[str] = []
    problems = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if not found:
            problems.append(f"rules: {pattern!r} matches no file")
        paths.extend(p for p in found if not p.endswith(".test.yaml"))
    try:
        groups = load_rule_files(list(dict.fromkeys(paths)), device_check=device_check)
    except ConfigError as err:
        problems.extend(err.problems)
        groups = []
    if problems:
        raise ConfigError(problems)
    return groups


def companion_test(rule_file: Path) -> Path:
    """Where the test of ``rules/x.yaml`` lives: ``rules/x.test.yaml``."""
    return rule_file.with_name(rule_file.name.removesuffix(".yaml") + ".test.yaml")


def load_test_file(path: Path) -> RuleTestFile:
    """A rule test file read with the same protections as a rule file."""
    return parse_test_file(read_rule_text(path), str(path))


def run_test_file(path: str | Path) -> list[RuleTestResult]:
    """Run every test in ``path`` against the rule files it names (relative to it); a
    broken test or rule file raises ConfigError."""
    path = Path(path)
    spec = load_test_file(path)
    groups = load_rule_files([path.parent / f for f in spec.rule_files])
    return run_tests(spec, str(path), groups)
