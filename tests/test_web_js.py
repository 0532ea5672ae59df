"""Runs the web extension's JavaScript unit tests (``node --test tests/js``) inside pytest, so CI runs them.

Skipped, with the reason, when no ``node`` (v18 or newer, for ``node:test``) is on PATH.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_web_extension_js_unit_tests():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: install Node.js >= 18 to run the web extension's tests (tests/js)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 18:
        pytest.skip(f"node {version} has no node:test; Node.js >= 18 runs tests/js")
    result = subprocess.run([node, "--test", "tests/js"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    passed = re.search(r"^# pass (\d+)$", output, re.M)
    assert passed and int(passed.group(1)) > 0 and re.search(r"^# fail 0$", output, re.M), output
