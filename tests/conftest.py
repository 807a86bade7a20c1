"""Shared fixtures. The end-to-end stack is started once per worker; tests isolate themselves by namespace."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

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
    if not stack.cluster:
        _assert_operator_calls_are_granted_by_rbac(stack)


OPERATOR_AGENTS = ("kopf", "kiloclaw-operator")


def _assert_operator_calls_are_granted_by_rbac(stack: Stack) -> None:
    """Every API call the operator (kopf and our own client) made in this worker's end-to-end tests must be
    granted by deploy/base/rbac.yaml: a new call without a rule fails the run."""
    from test_deploy import missing_rbac, operator_rbac_rules

    by_agent = stack.kube.rbac_verbs_by_agent
    seen = set().union(*(by_agent.get(agent, frozenset()) for agent in OPERATOR_AGENTS))
    assert seen, "the operator made no API calls: the RBAC check would prove nothing"
    missing = missing_rbac(seen, operator_rbac_rules())
    assert not missing, f"operator API calls not granted by deploy/base/rbac.yaml: {sorted(missing)}"


@pytest.fixture
async def namespace(stack: Stack) -> str:
    return await stack.create_namespace()
