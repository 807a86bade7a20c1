"""Prometheus's own ``promtool`` for the monitoring tests, built by ``tests/promtool/build.sh`` from the Go
modules pinned in ``tests/promtool/`` (the same pattern as ``tests/controlplane/cluster.sh``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BUILD = Path(__file__).resolve().parent / "promtool" / "build.sh"


class GoMissing(Exception):
    """No ``go`` on PATH: promtool cannot be built here."""


def promtool() -> Path:
    """The cached binary, built first when missing (a few minutes, once per pin and Go version)."""
    if shutil.which("go") is None:
        raise GoMissing("`go` is not on PATH, so promtool cannot be built from tests/promtool/")
    result = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building promtool failed:\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip())
