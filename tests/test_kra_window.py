"""The window in which head office's batches may hold the event loop (agent/kra_window.py): open
while a KRA request is on the wire or the KRA lane is idle, and never closed for longer than
`idle_after_s` after KRA's last answer, so neither lane can hold the other up."""

from __future__ import annotations

import asyncio
import time

from agent.kra_window import KraWindow


class Timer:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settles_within(window: KraWindow, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            await window.wait()
        return True
    except TimeoutError:
        return False


def test_open_before_the_kra_lane_has_sent_anything() -> None:
    assert asyncio.run(settles_within(KraWindow(idle_after_s=60.0), 0.05))


def test_closed_after_an_answer_until_the_next_request_is_on_the_wire() -> None:
    async def go() -> tuple[bool, bool, bool]:
        window = KraWindow(idle_after_s=60.0)
        window.sent()
        on_wire = await settles_within(window, 0.05)
        window.answered()
        waiter = asyncio.create_task(window.wait())
        await asyncio.sleep(0.1)
        closed = not waiter.done()
        window.sent()
        await asyncio.sleep(0.05)
        opened = waiter.done()
        waiter.cancel()
        return on_wire, closed, opened
    assert asyncio.run(go()) == (True, True, True)


def test_an_idle_kra_lane_holds_nothing_up_for_longer_than_the_bound() -> None:
    """KRA down, nothing to sign, or a request never written: after `idle_after_s` the window opens."""
    async def go() -> float:
        window = KraWindow(idle_after_s=0.2)
        window.answered()
        started = time.monotonic()
        await window.wait()
        return time.monotonic() - started
    assert 0.1 < asyncio.run(go()) < 2.0


def test_the_bound_counts_from_kras_last_answer() -> None:
    async def go() -> tuple[bool, bool]:
        timer = Timer()
        window = KraWindow(idle_after_s=0.5, timer=timer)
        window.answered()
        timer.now += 0.5
        after_the_bound = await settles_within(window, 0.05)
        timer.now += 10
        window.answered()
        return after_the_bound, await settles_within(window, 0.05)
    assert asyncio.run(go()) == (True, False)
