"""The operator image for the tests: which one (``KILOCLAW_IMAGE``, set by ``make e2e`` after
``tests/image/image.sh --local-base`` built it) and podman, configured by this project's containers.conf.

The image is built by the Makefile, not by a test: a build needs podman and the package registry (the build
step's ``pip install``) and takes a minute cold, which ``make test`` must not pay; ``make e2e`` builds it
(cached by the hash of its inputs) and hands its name over.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = ROOT / "tests" / "image" / "containers.conf"
PODMAN = shutil.which("podman")


def image_or_skip() -> str:
    image = os.environ.get("KILOCLAW_IMAGE", "")
    if PODMAN is None:
        pytest.skip("podman is not installed (apt-get install podman): the image cannot be run")
    if not image:
        pytest.skip(
            "no image to test: KILOCLAW_IMAGE is unset (make e2e builds it with tests/image/image.sh)"
        )
    return image


def podman_env() -> dict[str, str]:
    return dict(os.environ, CONTAINERS_CONF=os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF)))


def podman(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(PODMAN), *args], capture_output=True, text=True, timeout=timeout, env=podman_env()
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result
