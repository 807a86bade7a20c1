"""The API server's CPU profile during a benchmark's burst (``tests/benchmark.py --cluster --profile``).

``make cluster`` serves ``/debug/pprof`` to its admin (``--profiling``). A profile is taken over HTTP in a
thread while the burst runs, then summarised with ``go tool pprof`` (Go profiles carry their symbols): the top
functions by their own time, and what the burst costs the server by area — each area's largest cumulative
share among the functions that belong to it (areas nest, so the shares do not add up to 100 %).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path

import realcluster

#: Areas of the API server's work and the functions that stand for them (matched against pprof's names).
AREAS = (
    ("TLS (crypto/tls)", r"^crypto/tls\.\(\*Conn\)\.(Read|Write)$"),
    (
        "JSON encode/decode",
        r"(^encoding/json\.|^sigs\.k8s\.io/json\.|serializer/json\.\(\*Serializer\)\.(Encode|Decode))",
    ),
    (
        "managedFields (server-side apply's field manager)",
        r"fieldmanager.*\.(Update|Apply)$|^sigs\.k8s\.io/structured-merge-diff",
    ),
    (
        "admission and validation (CRD schema, CEL)",
        r"(apiextensions-apiserver/pkg/apiserver/schema|/cel/|admission.*\.Validate$)",
    ),
    ("watch fan-out (cacher)", r"storage/cacher\.\(\*(Cacher|cacheWatcher)\)"),
    ("etcd (storage)", r"^go\.etcd\.io/"),
    ("authentication and authorization", r"filters\.(withAuthentication|WithAuthorization)"),
    ("garbage collection", r"^runtime\.gcBgMarkWorker$"),
)


class ApiServerProfiler:
    """A ``seconds``-long CPU profile of the API server, fetched in a thread."""

    def __init__(self, path: Path, seconds: int) -> None:
        self.path = path
        self.seconds = seconds
        self.error = ""
        self._thread = threading.Thread(target=self._fetch, name="apiserver-profile", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            with realcluster.load_access().client(timeout=self.seconds + 60) as admin:
                response = admin.get("/debug/pprof/profile", params={"seconds": self.seconds})
            response.raise_for_status()
            self.path.write_bytes(response.content)
        except Exception as exc:  # a benchmark reports a failed profile, it does not abort for it
            self.error = f"{type(exc).__name__}: {exc}"

    def summary(self) -> str:
        self._thread.join(timeout=self.seconds + 90)
        if self.error or not self.path.exists():
            return f"(no API server profile: {self.error or 'not fetched'})"
        return summarize(self.path)


def _pprof(path: Path, *flags: str) -> list[str]:
    go = shutil.which("go")
    if go is None:
        return []
    done = subprocess.run(
        [go, "tool", "pprof", *flags, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    return done.stdout.splitlines()


_ROW = re.compile(r"^\s*\S+\s+(?P<flat>[\d.]+)%\s+[\d.]+%\s+\S+\s+(?P<cum>[\d.]+)%\s+(?P<name>.+)$")


def summarize(path: Path, top: int = 12) -> str:
    flat_rows = [m for line in _pprof(path, "-top", "-nodecount=200") if (m := _ROW.match(line))]
    cum_rows = [m for line in _pprof(path, "-top", "-cum", "-nodecount=400") if (m := _ROW.match(line))]
    if not flat_rows:
        return "(no API server profile: go tool pprof printed nothing)"
    lines = ["Own time, top functions:"]
    lines += [f"  {float(m['flat']):5.1f} %  {m['name']}" for m in flat_rows[:top]]
    lines.append("By area (largest cumulative share of a function in it):")
    for area, pattern in AREAS:
        shares = [float(m["cum"]) for m in cum_rows if re.search(pattern, m["name"])]
        lines.append(f"  {max(shares, default=0.0):5.1f} %  {area}")
    return "\n".join(lines)
