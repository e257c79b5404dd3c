"""The emulator speaks MQTT only through fieldmqtt: no paho, and no socket of its own
(which is where a hand-written packet writer would have to live)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_emulator_uses_the_shared_mqtt_layer_only():
    used = set()
    for path in sorted((ROOT / "devices").rglob("*.py")):
        modules = _imports(path)
        bad = {m for m in modules if m.split(".")[0] in {"paho", "socket", "mqtt5"}
               # mqtt5's value types (QoS, TopicFilter, Will) for the session's arguments
               and not (m == "mqtt5" and path.name in {"simulator.py", "gateways.py"})}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
        used |= modules
    assert any(m.split(".")[0] == "fieldmqtt" for m in used)
