"""``kiloclaw-operator run`` with a heap census on SIGUSR1 (``tests/benchmark.py --census``): where the
operator's memory is, by holder and by type, written as JSON to ``KILOCLAW_CENSUS_DIR/census-<n>.json``.

A benchmark aid, not part of the operator: it runs the operator's own entry point unchanged and only adds a
signal handler (the census runs between two bytecodes of the main thread, i.e. while the event loop is
between callbacks, and stalls it for the walk: seconds at 10,000 instances).

What it reports:
- ``rss``, and the allocators: pymalloc's arenas (``sys._debugmallocstats``: bytes in used blocks, free
  blocks in partly used pools and arenas) and glibc's ``mallinfo2`` (heap in use, free bytes malloc keeps);
- ``holders``: the deep size (every object reachable, counted once, shared objects counted in the first
  holder that reaches them) of what the operator keeps per instance: the drivers' bodies, the claim book, the
  feed's records, kopf's per-object memories, and the rest of the drivers;
- ``types``: count and shallow size by type of every object reachable from the gc's tracked objects.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import gc
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_LEAF_TYPES = (str, bytes, int, float, bool, type(None))


def deep_size(roots: Iterable[Any], seen: set[int]) -> tuple[int, int]:
    """(bytes, objects) reachable from ``roots`` that are not in ``seen`` yet (``seen`` is updated); types,
    modules and functions are not followed (they belong to the program, not to an instance)."""
    stack = list(roots)
    size = count = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | type(sys) | type(deep_size)):
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        count += 1
        if not isinstance(obj, _LEAF_TYPES):
            stack.extend(gc.get_referents(obj))
    return size, count


def pymalloc_stats() -> dict[str, int]:
    """sys._debugmallocstats() (it writes to the C-level stderr) parsed into the totals that matter."""
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
    stats: dict[str, int] = {}
    for label, key in (
        ("arenas allocated current", "arenas_current"),
        ("bytes in allocated blocks", "used_blocks"),
        ("bytes in available blocks", "free_blocks"),
        ("bytes in unused pools", "unused_pools"),
        ("bytes lost to pool headers", "pool_headers"),
        ("bytes lost to quantization", "quantization"),
        ("bytes lost to arena alignment", "arena_alignment"),
        ("Total", "total"),
    ):
        match = re.search(
            rf"^# {re.escape(label)}\s*=\s*([\d,]+)|^{re.escape(label)}\s*=\s*([\d,]+)", text, re.M
        )
        if match:
            stats[key] = int((match.group(1) or match.group(2)).replace(",", ""))
    return stats


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def glibc_stats() -> dict[str, int]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"heap": info.arena, "mmapped": info.hblkhd, "in_use": info.uordblks, "free": info.fordblks}


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _instances_of(*names: str) -> list[Any]:
    return [obj for obj in gc.get_objects() if type(obj).__name__ in names]


#: The program's shared objects: a holder's walk stops at them (else one reference to the runtime reaches
#: everything), unless the holder is one of them.
_SHARED = (
    "Context",
    "Runtime",
    "Settings",
    "KubeClient",
    "FlyClient",
    "FeedObserver",
    "ClaimBook",
    "DriverRegistry",
    "InstanceDriver",
    "RetainedVolumeDriver",
    "_UnixSelectorEventLoop",
    "Memo",
    "OperatorSettings",
    "ResourceMemories",
    "RecoveryBrake",
    "NamespaceBindings",
)


def census() -> dict[str, Any]:
    started = time.monotonic()
    report: dict[str, Any] = {"rss": rss(), "pymalloc": pymalloc_stats(), "glibc": glibc_stats()}
    # Cyclic garbage the operator's rare full collections have not freed yet: what a full collection frees
    # (objects, and bytes of pymalloc's used blocks), then the census of what is alive.
    tracked_before = len(gc.get_objects())
    collected = gc.collect()
    after = pymalloc_stats()
    report["garbage"] = {
        "collected": collected,
        "tracked_before": tracked_before,
        "tracked_after": len(gc.get_objects()),
        "used_blocks_freed": report["pymalloc"].get("used_blocks", 0) - after.get("used_blocks", 0),
        "gc_counts_and_thresholds": [gc.get_count(), gc.get_threshold()],
    }
    drivers = _instances_of("InstanceDriver")
    report["instances"] = len(drivers)
    shared = {id(obj) for obj in _instances_of(*_SHARED)}
    seen: set[int] = set()
    holders: dict[str, tuple[int, int]] = {}

    def held(name: str, roots: list[Any]) -> None:
        seen.difference_update(id(root) for root in roots)
        seen.update(shared - {id(root) for root in roots})
        holders[name] = deep_size(roots, seen)

    held("driver bodies (latest)", [d.latest for d in drivers if d.latest is not None])
    held("claim book", _instances_of("ClaimBook"))
    held("feed observer", _instances_of("FeedObserver"))
    held("kopf per-object memories", [m._items for m in _instances_of("ResourceMemories")])
    loops = [t for t in _instances_of("Task") if "_keep_running" in repr(t)]
    report["loops_waiting_at"] = _where_loops_wait(loops, shared)
    held("driver loops (tasks, frames)", loops)
    held("drivers (the rest)", drivers)
    for name in ("FlyClient", "KubeClient", "_UnixSelectorEventLoop", "ResourceMemories"):
        held(name, _instances_of(name))
    operator_contexts = [o for o in _instances_of("Context") if not isinstance(o, contextvars.Context)]
    held("the drivers' Context", operator_contexts)
    by_var: dict[str, list[Any]] = {}
    for context in (o for o in gc.get_objects() if isinstance(o, contextvars.Context)):
        for var, value in context.items():
            by_var.setdefault(f"contextvar {var.name}", []).append(value)
    for name, values in sorted(by_var.items(), key=lambda item: -len(item[1]))[:8]:
        held(f"{name} ({len(values)} contexts)", values)
    holders_of_contexts: dict[str, int] = {}
    for context in (o for o in gc.get_objects() if isinstance(o, contextvars.Context)):
        if any(var.name == "cause_var" for var in context):
            for referrer in gc.get_referrers(context):
                label = type(referrer).__name__
                if label in ("Task", "TimerHandle", "Handle"):
                    callback = getattr(referrer, "_callback", None) or getattr(referrer, "get_coro", str)()
                    label += f" {callback}"
                label = re.sub(r" at 0x[0-9a-f]+", "", str(label))[:120]
                holders_of_contexts[label] = holders_of_contexts.get(label, 0) + 1
    report["cause_context_referrers"] = dict(sorted(holders_of_contexts.items(), key=lambda i: -i[1])[:10])
    held("other tasks (kopf's workers, ...)", _instances_of("Task"))
    held("logging", [logging.root, *logging.root.manager.loggerDict.values()])
    seen.difference_update(shared)
    held("everything else reachable", [o for o in gc.get_objects() if id(o) not in seen])
    report["holders"] = {k: {"bytes": b, "objects": n} for k, (b, n) in holders.items()}
    seen.clear()
    types: dict[str, list[int]] = {}
    own = {id(types), id(holders)}
    walked: set[int] = set()
    own.add(id(walked))
    for obj in gc.get_objects():
        if id(obj) in own:
            continue
        for item in (obj, *(r for r in gc.get_referents(obj) if not gc.is_tracked(r))):
            if id(item) in walked:
                continue
            walked.add(id(item))
            entry = types.setdefault(type(item).__name__, [0, 0])
            entry[0] += 1
            entry[1] += sys.getsizeof(item)
    top = sorted(types.items(), key=lambda item: -item[1][1])[:25]
    report["types"] = {name: {"count": c, "bytes": b} for name, (c, b) in top}
    report["seconds"] = round(time.monotonic() - started, 2)
    return report


def _where_loops_wait(loops: list[Any], shared: set[int]) -> dict[str, dict[str, int]]:
    """Each driver loop's suspension point (its innermost operator frame and what it awaits there), counted,
    with the deep size of what the loops waiting there reach (shared objects not followed)."""
    places: dict[str, list[Any]] = {}
    for task in loops:
        coro = task.get_coro()
        where, awaited = "?", ""
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None and "kiloclaw_operator" in frame.f_code.co_filename:
                where = f"{frame.f_code.co_qualname}:{frame.f_lineno}"
            inner = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
            if inner is None or (not hasattr(inner, "cr_frame") and not hasattr(inner, "ag_frame")):
                awaited = type(inner).__name__ if inner is not None else ""
                break
            coro = inner
        places.setdefault(f"{where} <{awaited}>", []).append(task)
    report: dict[str, dict[str, int]] = {}
    for place, tasks in sorted(places.items(), key=lambda item: -len(item[1])):
        size, _ = deep_size(tasks, set(shared))
        report[place] = {"loops": len(tasks), "bytes": size}
    return report


def _describe(obj: Any) -> str:
    kind = type(obj).__name__
    if kind == "frame":
        return f"frame {obj.f_code.co_name} ({obj.f_code.co_filename.rsplit('/', 2)[-1]}:{obj.f_lineno})"
    if kind == "dict":
        return "dict{" + ",".join(str(k) for k in list(obj)[:6]) + "}"
    if kind == "cell":
        return "cell"
    return kind


def _is_body(obj: Any) -> bool:
    return type(obj) is dict and "metadata" in obj and ("spec" in obj or "status" in obj)


_TARGETS: dict[str, Any] = {
    "Instance": lambda o: type(o).__name__ == "Instance",
    "Machine": lambda o: type(o).__name__ == "Machine",
    "a decoded body": _is_body,
}


def _referrer_chains(name: str, samples: int = 4, depth: int = 8) -> list[list[str]]:
    """Who keeps a few live objects matching ``name``'s predicate: for each sample, one chain of referrers
    (level by level the first that is not the census's own bookkeeping)."""
    matches = _TARGETS[name]
    every = [o for o in gc.get_objects() if matches(o)]
    alive = len(every)
    picked = every[:: max(1, alive // samples)][:samples]
    del every
    chains: list[list[str]] = []
    while picked:
        current = picked.pop()
        chain: list[str] = []
        seen: set[int] = set()
        mine: set[int] = {id(picked)}
        for _ in range(depth):
            seen.add(id(current))
            found = gc.get_referrers(current)
            mine.add(id(found))
            referrers = [
                r
                for r in found
                if id(r) not in seen
                and id(r) not in mine
                and not (type(r).__name__ == "frame" and r.f_code.co_filename == __file__)
                and not (type(r) is list and len(r) > 1000)
            ]
            mine.add(id(referrers))
            del found
            if not referrers:
                break
            current = referrers[0]
            more = f" (+{len(referrers) - 1})" if len(referrers) > 1 else ""
            chain.append(_describe(current) + more)
        chains.append(chain)
        del current
    return [[f"{alive} alive"], *chains]


def collect_and_name_garbage() -> tuple[int, dict[str, int], list[str]]:
    """A full collection that says what it freed: the number of objects, the twenty commonest types among
    them, and, for the commonest types that are not containers, what the first cycle of each looked like
    (the types of the objects in it that refer to it): where a cycle is made, refcounting cannot free it and
    it waits for a rare full collection."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        collected = gc.collect()
        garbage = list(gc.garbage)
        gc.garbage.clear()
    finally:
        gc.set_debug(0)
    by_type: dict[str, int] = {}
    for obj in garbage:
        name = type(obj).__qualname__
        by_type[name] = by_type.get(name, 0) + 1
    common = dict(sorted(by_type.items(), key=lambda item: -item[1])[:20])
    in_garbage = {id(obj) for obj in garbage}
    examples: list[str] = []
    for name in [n for n in common if n not in ("dict", "list", "tuple", "cell", "function", "set")][:6]:
        sample = next(obj for obj in garbage if type(obj).__qualname__ == name)
        around = [type(r).__qualname__ for r in gc.get_referrers(sample) if id(r) in in_garbage][:6]
        inside = [type(r).__qualname__ for r in gc.get_referents(sample) if id(r) in in_garbage][:6]
        examples.append(f"{name}: referred to by {around}, refers to {inside}")
    del garbage
    return collected, common, examples


class PeakKeeper:
    """With tracing: a snapshot of the live memory at its largest so far (a thread looks every second and
    takes a new one when the traced memory has grown by a sixth since the last): what the census at the peak
    would have found, and, against the census, what of it has gone since (the transients whose freed blocks
    pymalloc may keep)."""

    def __init__(self) -> None:
        self.snapshot: Any = None
        self.size = 0
        self.at = ""

    def start(self) -> None:
        import threading

        threading.Thread(target=self._watch, name="census-peak", daemon=True).start()

    def _watch(self) -> None:
        import tracemalloc

        while True:
            time.sleep(1.0)
            current = tracemalloc.get_traced_memory()[0]
            if current > max(self.size * 7 // 6, 32 * 2**20):
                self.snapshot = _filtered(tracemalloc.take_snapshot())
                self.size = current
                self.at = time.strftime("%H:%M:%S")


PEAK = PeakKeeper()


def _filtered(snapshot: Any) -> Any:
    import tracemalloc

    return snapshot.filter_traces(
        [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        ]
    )


def traced() -> dict[str, Any]:
    """Where the live memory was allocated (``KILOCLAW_CENSUS_TRACE``: tracemalloc, started with the
    process): quicker than the deep census, which stalls a large operator for minutes."""
    import tracemalloc

    started = time.monotonic()
    # What a full collection frees first (cyclic garbage the operator's rare full collections leave).
    before = tracemalloc.get_traced_memory()[0]
    models_before = sum(1 for o in gc.get_objects() if type(o).__name__ == "Instance")
    collected, garbage_types, cycles = collect_and_name_garbage()
    garbage = {
        "collected": collected,
        "freed": before - tracemalloc.get_traced_memory()[0],
        "instances_before": models_before,
        "types": garbage_types,
        "cycles": cycles,
    }
    snapshot = _filtered(tracemalloc.take_snapshot())
    peak: dict[str, Any] = {}
    if PEAK.snapshot is not None:
        by_line = sorted(PEAK.snapshot.compare_to(snapshot, "lineno"), key=lambda d: d.size_diff)
        by_stack = sorted(PEAK.snapshot.compare_to(snapshot, "traceback"), key=lambda d: d.size_diff)
        peak = {
            "traced": PEAK.size,
            "at": PEAK.at,
            "gone": [
                [str(d.traceback[0]), -d.size_diff, -d.count_diff] for d in by_line[:25] if d.size_diff < 0
            ],
            "gone_stacks": [
                [[str(frame) for frame in d.traceback], -d.size_diff, -d.count_diff]
                for d in by_stack[:8]
                if d.size_diff < 0
            ],
        }
    lines = snapshot.statistics("lineno")
    stacks = snapshot.statistics("traceback")
    total = sum(stat.size for stat in lines)
    chains = {name: _referrer_chains(name) for name in _TARGETS}
    return {
        "chains": chains,
        "garbage": garbage,
        "rss": rss(),
        "traced": total,
        "instances": len(_instances_of("InstanceDriver")),
        "lines": [[str(stat.traceback[0]), stat.size, stat.count] for stat in lines[:40]],
        "stacks": [[[str(frame) for frame in stat.traceback], stat.size, stat.count] for stat in stacks[:15]],
        "peak": peak,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    directory = Path(os.environ.get("KILOCLAW_CENSUS_DIR", "."))
    taken = 0
    tracing = bool(os.environ.get("KILOCLAW_CENSUS_TRACE"))
    if tracing:
        import tracemalloc

        tracemalloc.start(int(os.environ["KILOCLAW_CENSUS_TRACE"]))
        PEAK.start()

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal taken
        taken += 1
        path = directory / f"census-{taken}.json"
        with contextlib.suppress(Exception):
            path.write_text(json.dumps(traced() if tracing else census(), indent=1))
        with contextlib.suppress(OSError):
            (directory / f"census-{taken}.done").touch()

    def trim(_signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGUSR2, trim)
    from kiloclaw_operator.__main__ import main as operator_main

    operator_main(["run"])


if __name__ == "__main__":
    main()
