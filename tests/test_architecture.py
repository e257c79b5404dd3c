"""The import rules of DESIGN.md, checked on the source (an AST walk)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_devices_never_import_gateway():
    for path in _modules("devices"):
        bad = {m for m in _imports(path) if m == "gateway" or m.startswith("gateway.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _runtime_imports(source: str) -> set[str]:
    """Modules imported outside ``if TYPE_CHECKING:`` blocks (those only name types)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _engine_import_problems(source: str) -> list[str]:
    """What a module of gateway/engine imports that the pure engine must not: another
    part of the gateway, a library besides numpy/pydantic/yaml/fieldkit, or anything that
    does I/O (files included: rules arrive as text, gateway/rulefiles.py reads them)."""
    allowed_third_party = {"numpy", "pydantic", "yaml", "fieldkit"}
    problems = []
    for module in sorted(_runtime_imports(source)):
        top = module.split(".")[0]
        if top == "gateway":
            if not module.startswith(("gateway.engine", "gateway.errors", "gateway.records")):
                problems.append(module)
        elif top not in allowed_third_party and top not in _stdlib_no_io():
            problems.append(module)
    return problems


def test_engine_is_pure_numpy_pydantic_and_no_io():
    for path in _modules("gateway/engine"):
        bad = _engine_import_problems(path.read_text())
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("line", [
    "import os", "from pathlib import Path", "import glob", "import shutil",
    "from gateway.rulefiles import read_rule_text", "import socket", "import paho.mqtt",
    "from gateway.log.store import LogStore",
])
def test_the_engine_check_catches_a_wrong_import(line):
    """The check above fails on an engine module that reads files or talks to the world
    (a deliberately wrong import), even inside a function; a type-only import is fine."""
    ok = "from __future__ import annotations\nimport math\nfrom gateway.engine import expr\n"
    assert _engine_import_problems(ok) == []
    assert _engine_import_problems(f"{ok}def f():\n    {line}\n")
    typed = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
             "    from pathlib import Path\n")
    assert _engine_import_problems(typed) == []


def _stdlib_no_io() -> set[str]:
    import sys

    io_modules = {"socket", "sqlite3", "ssl", "select", "selectors", "asyncio", "http",
                  "urllib", "subprocess",
                  # files: the engine takes rule text; gateway/rulefiles.py reads files
                  "os", "pathlib", "glob", "shutil", "tempfile", "io", "fileinput", "mmap"}
    return set(sys.stdlib_module_names) - io_modules


def test_sinks_never_import_each_other():
    sinks = [p for p in _modules("gateway/sinks") if p.name != "__init__.py"]
    names = {f"gateway.sinks.{p.stem}" for p in sinks}
    for path in sinks:
        own = f"gateway.sinks.{path.stem}"
        bad = {m for m in _imports(path) if m in names and m != own}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_wiring_and_cli_know_concrete_sinks():
    for path in _modules("gateway"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("gateway/sinks/", "gateway/cli/")) or rel == "gateway/daemon.py":
            continue
        bad = {m for m in _imports(path) if m.startswith("gateway.sinks.")}
        assert not bad, f"{rel} imports {bad}"


def test_paho_stays_behind_the_mqtt_package():
    allowed = {"gateway/dlq.py", "gateway/demo.py"}
    for path in _modules("gateway"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("gateway/mqtt/"):
            continue
        if any(m.startswith("paho") for m in _imports(path)):
            assert rel in allowed, f"{rel} imports paho directly"


def test_shared_layers_import_neither_gateway_nor_devices():
    for path in [*_modules("fieldmqtt"), *_modules("fieldkit")]:
        bad = {m for m in _imports(path) if m.split(".")[0] in {"gateway", "devices"}}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _own_private_names(roots: list[str]) -> set[str]:
    """Every ``_name`` our own code defines: functions, classes, attributes, assignments."""
    names: set[str] = set()
    for root in roots:
        for path in _modules(root):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    names.add(node.attr)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)
                elif isinstance(node, ast.arg):
                    names.add(node.arg)
                elif isinstance(node, ast.alias):
                    names.add(node.asname or node.name.split(".")[-1])
            # __slots__ and NamedTuple fields are strings
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and node.value.isidentifier():
                    names.add(node.value)
    return {n for n in names if n.startswith("_")}


CODE = ["gateway", "devices", "fieldmqtt", "fieldkit", "bench", "tests"]


def test_no_private_attribute_or_module_of_a_third_party_library_is_used():
    """Issue 10: a dependency's minor release must not break us. A ``x._name`` that our own
    code never defines belongs to someone else; so does a module path with a ``_`` part."""
    ours = _own_private_names(CODE)
    first_party = {"gateway", "devices", "fieldmqtt", "fieldkit", "bench", "tests"}
    found = []
    for root in CODE:
        for path in _modules(root):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                        and not node.attr.startswith("__") and node.attr not in ours:
                    found.append(f"{rel}:{node.lineno} .{node.attr}")
                modules = []
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                for module in modules:
                    parts = module.split(".")
                    if parts[0] not in first_party and parts[0] not in {"__future__"} \
                            and any(p.startswith("_") and not p.startswith("__")
                                    for p in parts[1:]):
                        found.append(f"{rel}:{node.lineno} import {module}")
    assert not found, "private parts of third-party libraries:\n" + "\n".join(found)


def _package_of(module: str) -> str | None:
    """gateway.log.store -> gateway.log; gateway.daemon -> gateway.daemon (a module of its
    own at the top of the package counts as one room)."""
    parts = module.split(".")
    if parts[0] != "gateway":
        return None
    return ".".join(parts[:2]) if len(parts) > 1 else None


def _package_graph(extra: tuple[tuple[str, str], ...] = ()) -> dict[str, set[str]]:
    """Which gateway package imports which; ``extra`` adds (importer, imported) module pairs
    (the test of the test adds a wrong one)."""
    graph: dict[str, set[str]] = {}
    pairs: list[tuple[str, str]] = list(extra)
    for path in _modules("gateway"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        pairs += [(".".join(parts), module) for module in _imports(path)]
    for importer, module in pairs:
        own, other = _package_of(importer), _package_of(module)
        if own is not None and other is not None and other != own:
            graph.setdefault(own, set()).add(other)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return sorted(set(cycles))


# The direction DESIGN.md draws: ingest -> log <- sinks. The log knows no transport, no
# ingest, no sink and no event format; ingest and the sinks do not know each other.
_FORBIDDEN = {
    "gateway.log": ("gateway.mqtt", "gateway.ingest", "gateway.sinks", "gateway.events",
                    "gateway.cloud", "gateway.commands", "gateway.rule_service"),
    "gateway.ingest": ("gateway.sinks", "gateway.cloud"),
    "gateway.sinks": ("gateway.ingest",),
    "gateway.engine": ("gateway.log", "gateway.ingest", "gateway.sinks", "gateway.mqtt"),
}


def _wrong_way(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{own} imports {other}" for own, banned in _FORBIDDEN.items()
                  for other in graph.get(own, ()) if other.startswith(banned))


def test_no_import_cycle_between_packages():
    cycles = _cycles(_package_graph())
    assert not cycles, "import cycles between packages:\n" + "\n".join(cycles)


def test_imports_run_the_way_the_design_draws():
    wrong = _wrong_way(_package_graph())
    assert not wrong, "imports against the design:\n" + "\n".join(wrong)


@pytest.mark.parametrize(("importer", "imported", "cycle"), [
    ("gateway.log.store", "gateway.sinks.uplink", True),    # log -> sinks -> log
    ("gateway.log.append", "gateway.ingest.decode", True),  # the old log <-> ingest cycle
    ("gateway.ingest.service", "gateway.sinks.influx", False),  # ingest must not know a sink
])
def test_the_import_checks_catch_a_wrong_import(importer, imported, cycle):
    graph = _package_graph(((importer, imported),))
    assert _wrong_way(graph), f"{importer} -> {imported} passed the direction check"
    assert bool(_cycles(graph)) is cycle


def test_the_log_imports_neither_mqtt_nor_ingest_nor_sinks_nor_event_formats():
    for path in _modules("gateway/log"):
        bad = {m for m in _imports(path)
               if m.startswith(("gateway.mqtt", "gateway.ingest", "gateway.sinks", "fieldmqtt",
                                "paho", "mqtt5", "gateway.events"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_emulator_uses_the_shared_mqtt_layer_only():
    """No paho and no socket of its own in devices/ (where a hand-written packet writer
    would have to live): its MQTT goes through fieldmqtt."""
    used = set()
    for path in _modules("devices"):
        modules = _imports(path)
        bad = {m for m in modules if m.split(".")[0] in {"paho", "socket", "mqtt5"}
               # mqtt5's value types (QoS, TopicFilter, Will) for the session's arguments
               and not (m == "mqtt5" and path.name in {"simulator.py", "gateways.py"})}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
        used |= modules
    assert any(m.split(".")[0] == "fieldmqtt" for m in used)


def test_a_plain_gateway_loads_neither_numpy_nor_cryptography():
    """What `gateway run` imports before its config asks for more: the rule engine (numpy,
    ~15 MB of RSS) only with rules, `cryptography` (~8 MB) only with cloud control."""
    import subprocess
    import sys

    probe = ("import sys, gateway.cli, gateway.daemon; "
             "print(sorted(m for m in ('numpy', 'cryptography') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]", f"loaded at start: {out}"
