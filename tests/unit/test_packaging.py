"""What the operator ships: the wheel (and so the image built from it) carries the operator package only,
never the test doubles (flysim, kubesim) nor their dev-only dependencies."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_the_operator_and_no_test_doubles(tmp_path: Path) -> None:
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
            str(tmp_path),
            ".",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("kiloclaw_operator-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/", 1)[0] for name in names if "/" in name and ".dist-info" not in name}
    assert packages == {"kiloclaw_operator"}, packages
    assert "kiloclaw_operator/fly/client.py" in names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    runtime = [line for line in requires if "extra ==" not in line]
    assert not any("cel-python" in line or "lupa" in line for line in runtime), runtime


def test_the_operator_package_never_imports_the_test_doubles_at_module_level() -> None:
    offenders = []
    for path in (ROOT / "operator" / "kiloclaw_operator").rglob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("import flysim", "from flysim", "import kubesim", "from kubesim")):
                offenders.append(f"{path.relative_to(ROOT)}: {line}")
    assert offenders == []
