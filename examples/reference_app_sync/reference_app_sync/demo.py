"""A standalone showcase, without the test plugin: ``reference-app-sync-demo`` or
``python -m reference_app_sync.demo``.

It points the app's ``SessionLocal`` at a temporary SQLite file, creates the tables, inserts a
few items (one of them made to fail), then runs :func:`process_pending_items` on two threads
at the same time, as two pool threads or two replicas would, and prints both reports and every
item's status and ``last_error``. The atomic claim gives each item to exactly one of the two
runs. The failing item's error is also logged, traceback included, as it would be in
production.
"""

from __future__ import annotations

import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import select

from reference_app_sync.database import (
    SessionLocal,
    background_session,
    build_engine,
    create_tables,
)
from reference_app_sync.models import Item
from reference_app_sync.processing import ProcessReport, process_pending_items

DEMO_PAYLOADS: tuple[dict[str, Any] | None, ...] = (
    {"name": "Ada", "language": "en"},
    {"fail": "payload rejected: no name"},
    None,
    {"name": "Grace"},
    {"name": "Edsger"},
    {"name": "Barbara"},
)
"""The payloads of the demo items; the second one makes ``enrich`` raise ``ValueError``."""

RUNS = 2
"""How many processing runs the demo starts at the same time."""


def run_demo(database_path: Path) -> tuple[list[ProcessReport], list[Item]]:
    """Run the demo against a new SQLite database at ``database_path``.

    Return the report of each concurrent run and the items at the end.
    """
    engine = build_engine(f"sqlite:///{database_path}")
    SessionLocal.configure(bind=engine)
    try:
        create_tables()
        with background_session() as session:
            session.add_all(Item(payload=payload) for payload in DEMO_PAYLOADS)
        with ThreadPoolExecutor(RUNS) as pool:
            runs = [pool.submit(process_pending_items, len(DEMO_PAYLOADS)) for _ in range(RUNS)]
            reports = [run.result() for run in runs]
        with background_session() as session:
            return reports, list(session.scalars(select(Item).order_by(Item.id)))
    finally:
        engine.dispose()


def describe(item: Item) -> str:
    """Return one line telling an item's status, attempts, ``last_error`` and result."""
    return (
        f"item {item.id}: {item.status:<10} attempts={item.attempts} "
        f"last_error={item.last_error!r} data={item.data}"
    )


def main() -> None:
    """Run the demo in a temporary directory and print each report and item."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as directory:
        reports, items = run_demo(Path(directory) / "demo.db")
    for number, report in enumerate(reports, start=1):
        print(f"run {number}: claimed {report.claimed}, skipped {report.skipped}")
    for item in items:
        print(describe(item))


if __name__ == "__main__":
    main()
