"""A standby's head start: the feed's first window, prepared while the leader is silent.

A new leader's feed first lists every instance, reads Fly's clock and sweeps the organisation from the oldest
observation (observe/feed.py); only then does it know which machines changed while no operator ran. At 10,000
instances that took ~3 s after the Lease was taken. The standby cannot take the Lease before the record has
stood unchanged for its duration (8 s by default), but it sees the leader's renewals stop long before: once
the record has not changed for ``silent_after`` seconds (several missed renewals) it does that work ahead,
without a write and without a changing Fly call, and the leader it becomes adopts it (``take``): its first
sweep then covers only what changed since. A renewal (or another replica taking the Lease) drops what was
prepared, since the leader is alive after all; so does a preparation that fails (the new leader lists then).

What a preparation lists may be seconds old at the take-over: the old leader may still have written until its
renew deadline. That is harmless: an instance whose status moved on since is read whole by its pass (the
listing only chooses which instances go first), and an older listing only makes the window start earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ..leadership import Silence
from .feed import FirstWindow

logger = logging.getLogger("kiloclaw.feed")


class HeadStart:
    """Follows the Lease's silence while this process stands by (``check``), and hands what it prepared to
    the leader this process becomes (``take``)."""

    def __init__(
        self,
        silence: Callable[[], Silence | None],
        prepare: Callable[[], Awaitable[FirstWindow]],
        *,
        silent_after: float,
        check_every: float,
    ) -> None:
        self._silence = silence
        self._prepare = prepare
        self._silent_after = silent_after
        self._check_every = check_every
        self._prepared: asyncio.Task[FirstWindow] | None = None
        #: The Lease record (resourceVersion) whose silence the preparation followed.
        self._prepared_for: str | None = None
        self.preparations = 0

    async def run(self) -> None:
        """Check every ``check_every`` seconds until cancelled (the process's life as a standby)."""
        try:
            while True:
                await asyncio.sleep(self._check_every)
                self.check()
        finally:
            self._drop()

    def check(self) -> None:
        silence = self._silence()
        if silence is None:
            return  # leading (the preparation waits for ``take``), or nobody holds the Lease
        if self._prepared is not None and silence.version != self._prepared_for:
            logger.info("the Lease changed after all: the prepared first window is dropped")
            self._drop()
        failure = self._failure()
        if failure is not None:
            logger.warning("preparing the feed's first window failed, trying again", exc_info=failure)
            self._drop()
        if self._prepared is None and silence.seconds >= self._silent_after:
            logger.info(
                "the leader has not renewed its Lease for %.1f s: preparing the feed's first window",
                silence.seconds,
            )
            self._prepared_for = silence.version
            self._prepared = asyncio.get_running_loop().create_task(
                self._preparation(), name="kiloclaw-head-start"
            )
            self.preparations += 1

    def take(self) -> asyncio.Task[FirstWindow] | None:
        """For the leader this process has just become: the preparation (done or still running), if any."""
        prepared, self._prepared = self._prepared, None
        return prepared

    def _failure(self) -> BaseException | None:
        prepared = self._prepared
        if prepared is None or not prepared.done() or prepared.cancelled():
            return None
        return prepared.exception()

    async def _preparation(self) -> FirstWindow:
        return await self._prepare()

    def _drop(self) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is None:
            return
        prepared.cancel()
        # Its outcome is of no interest any more: retrieved so that asyncio does not report it.
        prepared.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Task[FirstWindow]) -> None:
    with contextlib.suppress(BaseException):
        task.result()
