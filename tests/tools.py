"""Debian tools the tests need, found or reported; the gateway CLI as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def need(tool: str, package: str) -> str:
    """The path of a Debian tool a test needs. Missing: the test is skipped with the
    install line on a developer's machine, and fails in CI (CI=true), where .ci/run must
    have installed it, so that a missing install step cannot pass as a skip."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/bin:/usr/sbin")
    if found is None:
        why = f"{tool} is not installed: sudo apt-get install -y {package}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return found


ROOT = Path(__file__).resolve().parents[1]


def gateway(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`gateway ARGS` as a separate process, its output captured."""
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env=env)
