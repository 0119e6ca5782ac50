"""The code has no unused imports, undefined names or shadowed definitions (pyflakes)."""
from __future__ import annotations

import subprocess
import sys

from shared.settings import REPO_ROOT

PACKAGES = ("web", "shared", "worker", "webhooks", "client", "tools", "bench", "scripts", "tests", "deploy")


def test_pyflakes_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "pyflakes", *PACKAGES], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout, done.stdout + done.stderr
