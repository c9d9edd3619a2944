"""Every benchmark in one run, printed as one table (what `make bench` runs).

    .venv/bin/python bench/all.py [--quick] [--only SECTION,...] [--record] [--build]

Runs bench/ingest.py (intake), bench/drain.py (KRA signing), bench/head_office_load.py (a till's
latency while head-office batches are signed), bench/startup.py (start-up),
bench/memory.py (memory and disk over 100,000 sales) and bench/sync.py (TSMS under the real rate
limit) one after another, each on its own temporary data directory and processes, and prints all
their rows as one table: measure | result | limit / target | verdict (PASS, MISS, or INFO where
there is no target), after the machine's description. The full run takes about 20 minutes on a
2-core machine (the memory section posts 100,000 signed sales, sync waits out 3 rate-limit windows).

--quick scales the sizes down for a fast look (about 4 minutes; its verdicts rest on smaller
samples, and the memory growth is then measured from 2,000 to 20,000 sales). --record writes the
table, the machine and the command into docs/performance.md between its generated-table markers
(refused with --quick or --only: the recorded table comes from a full run). --build builds
dist/etims-agent first if it is missing. Exit code 1 if a section failed or a correctness check
(answers, signatures, exactly-once) did not hold; a missed performance target alone still exits 0.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import drain
import head_office_load
import ingest
import memory
import startup
import sync
from common import (
    MISS,
    ROOT,
    Row,
    broken,
    cpu_ticks,
    load_average,
    machine,
    print_table,
    say,
    stolen_since,
    table_markdown,
)

DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench/all.py: generated table, begin -->", "<!-- bench/all.py: generated table, end -->"


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    measure: Callable[[Sequence[str] | None], list[Row]]
    quick: tuple[str, ...]  # options for --quick; the full run uses each script's defaults


SECTIONS = (
    Section("ingest", "intake (bench/ingest.py)", ingest.measure, ("--sales", "1000", "--duration", "2")),
    Section("drain", "KRA signing (bench/drain.py)", drain.measure, ("--sales", "200", "--online", "50")),
    Section("head-office-load", "a till beside head-office signing (bench/head_office_load.py)",
            head_office_load.measure, ("--sales", "300")),
    Section("startup", "start-up (bench/startup.py)", startup.measure, ("--runs", "2")),
    Section("memory", "memory and disk (bench/memory.py)", memory.measure,
            ("--sales", "20000", "--step", "2000", "--slow-shop", "1000")),
    Section("sync", "TSMS sync (bench/sync.py)", sync.measure, ("--sales", "1000",)),
)


def run_section(section: Section, options: Sequence[str]) -> tuple[list[Row], float]:
    """The section's rows under a heading row, and its run time; a failure becomes a MISS row."""
    say(f"== {section.title} {' '.join(options)}")
    started, load_before, ticks = time.monotonic(), load_average(1), cpu_ticks()
    try:
        rows = section.measure(list(options))
    except Exception as exc:  # one section failing must not lose the others' figures
        traceback.print_exc(file=sys.stderr)
        rows = [Row(f"{section.name}: the run failed", f"{type(exc).__name__}: {str(exc)[:150]}".replace("\n", " "),
                    "it runs", MISS, check=True)]
    seconds = time.monotonic() - started
    say(f"== {section.name} took {seconds:.0f} s")
    # The 1-minute load average beside each section: other work on the machine shows as noise.
    heading = Row(f"[{section.title}]", f"{seconds:.0f} s, load {load_before} -> {load_average(1)}, "
                  f"steal {stolen_since(ticks)}", "", "")
    return [heading, *rows], seconds


def checkout() -> str:
    """The commit measured, and whether the working tree differed from it (read-only git calls)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{commit}{' plus uncommitted changes' if git('status', '--porcelain') else ''}"


def record(rows: Sequence[Row], command: str, facts: Sequence[str], seconds: float) -> None:
    """Put the table between the markers in docs/performance.md (created with just the table if missing)."""
    block = "\n".join([
        BEGIN,
        f"Recorded {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}` in {seconds / 60:.1f} minutes, "
        f"on checkout {checkout()}.",
        "",
        *(f"- {fact}" for fact in facts),
        "",
        table_markdown(rows),
        END,
    ])
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC.relative_to(ROOT)} lacks the markers {BEGIN} ... {END}; put them where the table goes")
    head, rest = text.split(BEGIN, 1)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(head + block + rest.split(END, 1)[1], encoding="utf-8")
    say(f"recorded in {DOC.relative_to(ROOT)}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smaller sizes for a fast look (not for the record)")
    p.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(s.name for s in SECTIONS)}")
    p.add_argument("--record", action="store_true", help="write the table into docs/performance.md")
    p.add_argument("--build", action="store_true", help="build dist/etims-agent first if it is missing")
    args = p.parse_args(argv)
    names = {s.name for s in SECTIONS}
    args.only = [n for n in args.only.split(",") if n]
    if unknown := set(args.only) - names:
        p.error(f"unknown sections {sorted(unknown)}; choose from {sorted(names)}")
    if args.record and (args.quick or args.only):
        p.error("--record takes a full run: drop --quick and --only")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    facts = machine()
    started, load_before, ticks = time.monotonic(), load_average(), cpu_ticks()
    rows: list[Row] = []
    for section in SECTIONS:
        if args.only and section.name not in args.only:
            continue
        options = list(section.quick if args.quick else ())
        if section.name == "startup" and args.build:
            options.append("--build")
        section_rows, _ = run_section(section, options)
        rows += section_rows
    seconds = time.monotonic() - started
    facts.append(f"load average (1/5/15 min) before: {load_before}, after: {load_average()}; "
                 f"CPU time taken by the host (steal): {stolen_since(ticks)}")
    print()
    for fact in facts:
        print(fact)
    print()
    print_table(rows)
    print(f"\n{len(rows)} rows in {seconds / 60:.1f} minutes{' (--quick: not for the record)' if args.quick else ''}")
    if args.record:
        record(rows, "make bench BENCH_ARGS=--record", facts, seconds)
    return 1 if broken(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
