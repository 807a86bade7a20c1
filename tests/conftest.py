"""Shared fixtures. The end-to-end stack is started once per worker; tests isolate themselves by namespace."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Stack


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("stack"))
    await stack.start()
    try:
        yield stack
    finally:
        await stack.close()


@pytest.fixture
async def namespace(stack: Stack) -> str:
    return await stack.create_namespace()
