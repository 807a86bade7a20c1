"""The C allocator's thresholds, set once at start-up (allocator.py): in a process of its own, since they
last for the life of the process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)

PROGRAM = "import json; from kiloclaw_operator import allocator; print(json.dumps(allocator.tune()))"


def tuned(**env: str) -> dict[str, int]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    result: dict[str, int] = json.loads(done.stdout)
    return result


@glibc_only
def test_glibc_maps_large_blocks_on_their_own_and_hands_freed_memory_back() -> None:
    assert tuned() == {"M_MMAP_THRESHOLD": 65536, "M_TRIM_THRESHOLD": 262144, "M_ARENA_MAX": 2}


@glibc_only
def test_an_operator_run_with_its_own_malloc_settings_is_left_as_it_is() -> None:
    assert tuned(MALLOC_ARENA_MAX="4") == {}


TLS_PROGRAM = """
import asyncio, ssl
from kiloclaw_operator import allocator

def connection():
    loop = asyncio.get_running_loop()
    return asyncio.sslproto.SSLProtocol(loop, asyncio.Protocol(), ssl.create_default_context(), None)

async def main():
    before = connection()
    allocator.shrink_tls_read_buffers()
    after = connection()
    print(len(before._ssl_buffer), len(after._ssl_buffer))

asyncio.run(main())
"""


def test_tls_connections_opened_after_start_up_keep_a_small_read_buffer() -> None:
    done = subprocess.run([sys.executable, "-c", TLS_PROGRAM], capture_output=True, text=True, check=True)
    before, after = map(int, done.stdout.split())
    assert before == 256 * 1024, "asyncio's own default (what the operator no longer keeps per connection)"
    assert after == 32 * 1024
