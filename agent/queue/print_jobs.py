"""The printers' side of the outbox: receipts waiting for a printer, kept across restarts.

A job is one receipt for one printer, named by the printer's URL as configured. It stays until
the receipt is on paper: the print is counted and the job removed in one transaction, so a job is
printed at least once; a stop between the paper and that commit prints it again after the restart.
Jobs are committed without their own fsync: a power cut may lose one queued in the last moment
before it, never a sale.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime

from agent.queue.outbox import Outbox, count_print_in, timestamp


class PrintJobs:
    def __init__(self, outbox: Outbox, printer: str) -> None:
        self._box = outbox
        self.printer = printer

    def add(self, jobs: Iterable[tuple[int, str]], now: datetime) -> None:
        """Queue (sale id, receipt kind) jobs after those waiting; one already waiting is not added twice."""
        rows = [(self.printer, sale_ref, kind, timestamp(now)) for sale_ref, kind in jobs]
        if rows:
            with self._box._write(flush=False) as conn:
                conn.executemany("INSERT OR IGNORE INTO print_jobs (printer, sale_ref, kind, queued_at) "
                                 "VALUES (?, ?, ?, ?)", rows)

    def waiting(self, limit: int = 100) -> list[tuple[int, str]]:
        """The oldest jobs, first in line first."""
        with self._box._read() as conn:
            rows = conn.execute("SELECT sale_ref, kind FROM print_jobs WHERE printer = ? ORDER BY rowid LIMIT ?",
                                (self.printer, limit)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def count(self) -> int:
        with self._box._read() as conn:
            return int(conn.execute("SELECT count(*) FROM print_jobs WHERE printer = ?",
                                    (self.printer,)).fetchone()[0])

    def printed(self, sale_ref: int, job_kind: str, printed_kind: str, now: datetime) -> None:
        """The job's receipt is on paper (`printed_kind`: signed, if KRA signed the sale meanwhile).
        Synced to disk, as every counted print is: the next print of it must say COPY."""
        with self._box._write() as conn:
            self._remove(conn, sale_ref, job_kind)
            count_print_in(conn, sale_ref, printed_kind, now)

    def dropped(self, sale_ref: int, job_kind: str) -> None:
        """The job's sale is no longer stored (retention pruned it): nothing to print."""
        with self._box._write(flush=False) as conn:
            self._remove(conn, sale_ref, job_kind)

    def _remove(self, conn: sqlite3.Connection, sale_ref: int, job_kind: str) -> None:
        conn.execute("DELETE FROM print_jobs WHERE printer = ? AND sale_ref = ? AND kind = ?",
                     (self.printer, sale_ref, job_kind))

    def known(self, sale_ref: int) -> bool:
        """Whether a receipt of the sale was printed (by any printer, or rendered through the API) or
        waits for this printer."""
        with self._box._read() as conn:
            found: int = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM receipt_prints WHERE sale_ref = ?) "
                "OR EXISTS (SELECT 1 FROM print_jobs WHERE printer = ? AND sale_ref = ?)",
                (sale_ref, self.printer, sale_ref)).fetchone()[0]
        return found == 1

    def signed_since_temporary(self, limit: int = 20) -> list[int]:
        """Sales whose temporary receipt was printed and which KRA has signed since, with no signed
        print yet and none waiting for this printer."""
        with self._box._read() as conn:
            rows = conn.execute(
                "SELECT p.sale_ref FROM receipt_prints p JOIN sales s ON s.id = p.sale_ref "
                "WHERE p.kind = 'temporary' AND s.kra_state = 'signed' "
                "AND NOT EXISTS (SELECT 1 FROM receipt_prints q WHERE q.sale_ref = p.sale_ref AND q.kind = 'signed') "
                "AND NOT EXISTS (SELECT 1 FROM print_jobs j WHERE j.printer = ? AND j.sale_ref = p.sale_ref) "
                "ORDER BY p.sale_ref LIMIT ?", (self.printer, limit)).fetchall()
        return [r[0] for r in rows]


def forget_other_printers(outbox: Outbox, printers: Iterable[str]) -> int:
    """Remove the jobs of printers no longer configured; returns how many there were."""
    urls = list(printers)
    marks = ", ".join("?" * len(urls))
    with outbox._write(flush=False) as conn:
        return conn.execute(f"DELETE FROM print_jobs WHERE printer NOT IN ({marks})", urls).rowcount
