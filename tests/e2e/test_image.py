"""The operator image as built from the Dockerfile (``make e2e`` builds it on a locally made Debian base,
``tests/image/image.sh --local-base``; ``make image`` builds it on the pinned public base): who it runs as,
what is (not) inside, that its entrypoint starts on a read-only root filesystem, and how large it is."""

from __future__ import annotations

import json

import pytest

from imagetools import image_or_skip, podman

# The virtualenv (the operator and its runtime dependencies) is what the Dockerfile adds to the base; ~38 MB
# when this was written, ~47 MiB before the official kubernetes client came in for the login (issue 18): its
# configuration loading comes with a generated API of ~57 MB that `import kubernetes` loads (the asyncio copy,
# 68 MB more, is left out by the Dockerfile). The base is the python image's business (the local stand-in is
# Debian's python3).
VENV_BUDGET_MB = 120


@pytest.fixture(scope="module")
def image() -> str:
    return image_or_skip()


def run_python(image: str, code: str) -> str:
    result = podman(
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--entrypoint",
        "python3",
        image,
        "-c",
        code,
        check=True,
    )
    return result.stdout.strip()


def test_the_image_runs_as_the_numeric_non_root_user_of_the_deployment(image: str) -> None:
    config = json.loads(podman("image", "inspect", image, check=True).stdout)[0]["Config"]
    # Numeric, so that the kubelet can check runAsNonRoot without an /etc/passwd entry.
    assert config["User"] == "65532:65532"
    assert run_python(image, "import os; print(os.getuid(), os.getgid())") == "65532 65532"


def test_any_runtime_uid_without_a_passwd_entry_has_a_user_name(image: str) -> None:
    """A kubelet runs the container as runAsUser without adding an /etc/passwd entry (podman adds one unless
    --passwd=false); kopf asks getpass.getuser() for its identity, which then fails without USER. Found when
    the Deployment first ran on a real node (tests/e2e/test_node_e2e.py)."""
    for user in ("65532:65532", "1000730000:0"):
        result = podman(
            "run", "--rm", "--network", "none", "--read-only", "--passwd=false", "--user", user,
            "--entrypoint", "python3", image, "-c", "import getpass; print(getpass.getuser())",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "kiloclaw-operator"


def test_the_entrypoint_is_the_operators_run_command_and_answers_help_on_a_read_only_root(image: str) -> None:
    config = json.loads(podman("image", "inspect", image, check=True).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["kiloclaw-operator", "run"]
    helped = podman("run", "--rm", "--network", "none", "--read-only", image, "--help", check=True)
    assert helped.stdout.startswith("usage: kiloclaw-operator run"), helped.stdout
    assert "--namespaces" in helped.stdout


def test_without_a_cluster_the_entrypoint_stops_at_once_with_one_line_saying_what_is_missing(
    image: str,
) -> None:
    """No kubeconfig and no ServiceAccount token in the container: exit code 1 and one line, not retries."""
    result = podman(
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--env",
        "FLY_API_TOKEN=x",
        image,
        timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "kubeconfig" in lines[0], result.stderr


def test_the_image_carries_no_simulators_no_tests_and_no_development_tools(image: str) -> None:
    found = run_python(
        image,
        "import importlib.util as u, json; print(json.dumps([m for m in "
        "('flysim', 'kubesim', 'pytest', 'mypy', 'ruff', 'celpy', 'lupa', 'pip', 'setuptools', 'tests', "
        "'harness', 'conftest') if u.find_spec(m)]))",
    )
    assert json.loads(found) == []
    # No file of the repository's tests or simulators anywhere in the image, and no build leftovers.
    files = podman(
        "run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "find", image, "/", "-xdev",
        "(", "-path", "/proc", "-o", "-path", "/sys", "-o", "-path", "/dev", ")", "-prune", "-o",
        "(", "-name", "flysim", "-o", "-name", "kubesim", "-o", "-name", "conftest.py",
        "-o", "-name", "harness.py", "-o", "-path", "*/kiloclaw_operator/*test*",
        "-o", "-path", "/src", "-o", "-path", "/wheels", ")", "-print",
    )  # fmt: skip
    assert files.returncode == 0, files.stderr
    assert files.stdout.split() == [], files.stdout
    assert run_python(image, "import kiloclaw_operator, sys; print(kiloclaw_operator.__file__)").startswith(
        "/opt/venv/lib/"
    )


def test_the_virtualenv_stays_small_and_the_image_size_is_reported(
    image: str, record_property: pytest.RecordProperty
) -> None:
    size = json.loads(podman("image", "inspect", image, check=True).stdout)[0]["Size"]
    venv_kb = int(
        podman(
            "run", "--rm", "--network", "none", "--entrypoint", "du", image, "-sk", "/opt/venv", check=True
        ).stdout.split()[0]
    )
    record_property("image_size_mb", round(size / 1e6, 1))
    record_property("venv_size_mb", round(venv_kb / 1024, 1))
    print(f"\nimage {image}: {size / 1e6:.1f} MB, of which the virtualenv {venv_kb / 1024:.1f} MiB")
    assert venv_kb / 1024 < VENV_BUDGET_MB, f"the virtualenv grew to {venv_kb / 1024:.0f} MiB"
