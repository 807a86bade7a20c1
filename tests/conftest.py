"""Shared fixtures. The end-to-end stack is started once per worker; tests isolate themselves by namespace."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ClusterUnavailable, Stack


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cluster",
        action="store_true",
        help="run the end-to-end tests against the current kube context instead of the emulated API",
    )


@pytest.fixture(scope="session")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("stack"), cluster=request.config.getoption("--cluster"))
    try:
        await stack.start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no reachable Kubernetes cluster: {exc}")
    try:
        yield stack
    finally:
        await stack.close()


@pytest.fixture
async def namespace(stack: Stack) -> str:
    return await stack.create_namespace()
