"""How the C allocator under Python hands memory back (glibc only; elsewhere nothing changes).

The operator's heap at 10,000 instances is mostly Python objects under 512 bytes, which Python keeps in its
own arenas; everything larger (decoded bodies' tables, JSON strings, the 256 KiB read buffer of every TLS
connection) comes from glibc's malloc. By default glibc raises its mmap threshold each time a large block is
freed, so the next ones come from the heap, where one block still in use keeps the pages around it: after a
provisioning burst most of the freed memory stayed in the process. A fixed threshold (large blocks are mapped
and unmapped on their own) and a trim threshold hand it back; two arenas are plenty for an event loop and
three helper threads.

An operator run with any ``MALLOC_*`` variable set is left as it is: whoever set it chose.

Every TLS connection (to the API server, kopf's and the adapters', and to Fly) also keeps a read buffer of
its own for its lifetime, 256 KiB by default in asyncio; 32 KiB holds two TLS records, the most one read
decrypts, so nothing is read more slowly (``shrink_tls_read_buffers``).
"""

from __future__ import annotations

import asyncio.sslproto
import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger("kiloclaw.operator")

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: Blocks at least this large are mapped on their own and unmapped when freed.
MMAP_THRESHOLD_BYTES = 64 * 1024
#: Free memory at the top of the heap beyond this goes back to the system.
TRIM_THRESHOLD_BYTES = 256 * 1024
ARENAS = 2
#: The read buffer of every TLS connection opened after start-up.
TLS_READ_BUFFER_BYTES = 32 * 1024


def shrink_tls_read_buffers() -> int:
    """Make every TLS connection asyncio opens from now on keep a ``TLS_READ_BUFFER_BYTES`` read buffer
    (asyncio's default, 256 KiB per connection, was 13 MiB of an operator's 250 at 4,000 instances); returns
    the size set (0: this Python's asyncio has no such buffer, nothing changed)."""
    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if protocol is None or not isinstance(getattr(protocol, "max_size", None), int):
        return 0
    protocol.max_size = TLS_READ_BUFFER_BYTES
    return TLS_READ_BUFFER_BYTES


def tune() -> dict[str, int]:
    """Set glibc's thresholds (see the module's docstring); returns what was set (empty: nothing)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return {}
    if any(key.startswith("MALLOC_") for key in os.environ):
        return {}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    wanted = {
        "M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        "M_ARENA_MAX": (M_ARENA_MAX, ARENAS),
    }
    applied: dict[str, int] = {}
    for name, (parameter, value) in wanted.items():
        if mallopt(parameter, value) == 1:  # 1: success, 0: refused
            applied[name] = value
        else:
            logger.warning("glibc refused mallopt(%s, %d)", name, value)
    return applied
