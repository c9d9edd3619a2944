"""The periodic work, on APScheduler 3.x with its in-memory job store (design.md: durable state
lives in the outbox, never in the scheduler, so nothing is lost when the process dies)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]

from agent.logs import get_logger

log = get_logger("agent.scheduler")


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    run: Callable[[], Awaitable[object]]
    every_s: float
    at_start: bool = True  # run once right away, then every `every_s`


def start(jobs: tuple[Job, ...], now: datetime) -> AsyncIOScheduler:
    """Start the jobs on the running event loop; a job never overlaps itself, a late run is merged."""
    scheduler = AsyncIOScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None})
    for job in jobs:
        # next_run_time=None would add the job paused, so it is only given to start at once.
        first = {"next_run_time": now} if job.at_start else {}
        scheduler.add_job(_guarded(job), "interval", seconds=job.every_s, id=job.name, name=job.name, **first)
    scheduler.start()
    return scheduler


def _guarded(job: Job) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        try:
            await job.run()
        except Exception:  # one failing run must not unschedule the job; the next one tries again
            log.exception("job_failed", job=job.name)
    return run
