"""What each distribution ships. The operator's wheel (and so the image built from it) carries the operator
package only, never the test doubles (flysim, kubesim) nor their dependencies; kiloclaw-dev
(operator/kiloclaw-dev/) carries the simulators and the dev stack with the repository's CRDs and examples, so
that ``kiloclaw-dev`` runs from an install, not only from a clone."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import free_port
from processes import clean_env, stop

ROOT = Path(__file__).resolve().parents[2]
DEV_DISTRIBUTION = ROOT / "operator" / "kiloclaw-dev"
UNBUILT = ("build", "*.egg-info", "__pycache__")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both wheels, built offline (no build isolation: the venv has setuptools) from a copy of the working
    tree as a clean checkout has it: an old build/ folder would put modules that no longer exist in them."""
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    for name in ("operator", "crds", "examples"):
        shutil.copytree(ROOT / name, tree / name, symlinks=True, ignore=shutil.ignore_patterns(*UNBUILT))
    folder = tmp_path_factory.mktemp("wheels")
    for source in (tree, tree / DEV_DISTRIBUTION.relative_to(ROOT)):
        built = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                folder,
                ".",
            ],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert built.returncode == 0, built.stderr
    return folder


def _contents(wheel: Path) -> tuple[list[str], list[str]]:
    """The wheel's file names and its runtime (not extra) requirements."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            line.removeprefix("Requires-Dist: ")
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        ]
    return names, requires


def _packages(names: list[str]) -> set[str]:
    return {name.split("/", 1)[0] for name in names if "/" in name and ".dist-info" not in name}


def test_the_operator_wheel_carries_the_operator_and_no_test_doubles(wheels: Path) -> None:
    [wheel] = wheels.glob("kiloclaw_operator-*.whl")
    names, runtime = _contents(wheel)
    assert _packages(names) == {"kiloclaw_operator"}
    assert "kiloclaw_operator/fly/client.py" in names
    assert not any(name.endswith("dev.py") or "/crds/" in name for name in names), names
    assert not any(req.startswith(("cel-python", "lupa", "kiloclaw-dev")) for req in runtime), runtime


def test_the_dev_wheel_carries_the_simulators_the_dev_stack_and_the_repositorys_crds_and_examples(
    wheels: Path,
) -> None:
    [wheel] = wheels.glob("kiloclaw_dev-*.whl")
    names, runtime = _contents(wheel)
    assert _packages(names) == {"flysim", "kubesim", "kiloclaw_dev"}
    assert "kiloclaw-operator==0.1.0" in runtime
    with zipfile.ZipFile(wheel) as archive:
        for folder in ("crds", "examples"):
            for path in (ROOT / folder).glob("*.yaml"):
                assert archive.read(f"kiloclaw_dev/{folder}/{path.name}") == path.read_bytes(), path
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "kiloclaw-dev = kiloclaw_dev.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture(scope="module")
def installed(wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with both wheels installed from files only (--no-index). The machine may have no
    package index and no wheels of the dependencies, so they come from this venv's site-packages, placed
    after the fresh one's: every import of the operator, the simulators and the dev stack finds the wheels."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--ignore-installed",
            *wheels.glob("*.whl"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    check = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    return venv


@pytest.mark.slow  # a fresh virtualenv and a dev stack process
def test_the_installed_packages_are_the_wheels_not_the_working_tree(installed: Path) -> None:
    where = subprocess.run(
        [
            installed / "bin" / "python",
            "-c",
            "import flysim, kiloclaw_dev, kiloclaw_operator, kubesim\n"
            "for module in (flysim, kiloclaw_dev, kiloclaw_operator, kubesim): print(module.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=installed,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    files = where.stdout.split()
    assert len(files) == 4 and all(file.startswith(str(installed)) for file in files), files


@pytest.fixture
def dev_process(installed: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    ports = [free_port() for _ in range(4)]
    flags = ("--port", "--fly-port", "--metrics-port", "--health-port")
    out = tmp_path / "dev.out"
    with out.open("wb") as stdout:
        process = subprocess.Popen(
            [installed / "bin" / "kiloclaw-dev", *(f"{f}={p}" for f, p in zip(flags, ports, strict=True))],
            env=clean_env(),
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            cwd=tmp_path,
        )
    try:
        yield process, out
    finally:
        # A smoke test: how the stack shuts down is test_run_and_dev.py's, not this one's.
        stop(process, signal.SIGKILL)


@pytest.mark.slow  # a fresh virtualenv and a dev stack process
def test_the_installed_kiloclaw_dev_serves_the_crds_and_applies_the_examples_outside_a_clone(
    dev_process: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, out = dev_process
    deadline = time.monotonic() + 60
    while "applied examples/" not in out.read_text():
        assert process.poll() is None, out.read_text()
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.1)


def test_the_operator_package_never_imports_the_test_doubles() -> None:
    offenders = []
    for path in (ROOT / "operator" / "kiloclaw_operator").rglob("*.py"):
        for line in path.read_text().splitlines():
            if line.strip().startswith(("import flysim", "from flysim", "import kubesim", "from kubesim")):
                offenders.append(f"{path.relative_to(ROOT)}: {line}")
    assert offenders == []
