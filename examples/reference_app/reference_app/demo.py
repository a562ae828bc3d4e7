"""A standalone showcase, without the test plugin: ``python -m reference_app.demo``.

It points the app's session factory at a temporary SQLite file, creates the tables, inserts a
few items (one of them made to fail), runs :func:`process_pending_items` once and prints every
item's status and ``last_error``. The failing item's error is also logged, traceback included,
as it would be in production.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from reference_app.models import Item
from reference_app.processing import process_pending_items
from reference_app.session import async_session_factory, create_tables, get_background_session

DEMO_PAYLOADS: tuple[dict[str, Any] | None, ...] = (
    {"name": "Ada", "language": "en"},
    {"fail": "payload rejected: no name"},
    None,
    {"name": "Grace"},
)
"""The payloads of the demo items; the second one makes ``enrich`` raise ``ValueError``."""


async def run_demo(database_path: Path) -> list[Item]:
    """Run the demo against a new SQLite database at ``database_path``; return the items."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{database_path}")
    async_session_factory.configure(bind=engine)
    try:
        await create_tables()
        async with get_background_session() as session:
            session.add_all(Item(payload=payload) for payload in DEMO_PAYLOADS)
        report = await process_pending_items(limit=len(DEMO_PAYLOADS))
        print(f"report: {report}")
        async with get_background_session() as session:
            return list(await session.scalars(select(Item).order_by(Item.id)))
    finally:
        await engine.dispose()


def describe(item: Item) -> str:
    """Return one line telling an item's status, attempts, ``last_error`` and result."""
    return (
        f"item {item.id}: {item.status:<10} attempts={item.attempts} "
        f"last_error={item.last_error!r} data={item.data}"
    )


def main() -> None:
    """Run the demo in a temporary directory and print each item."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as directory:
        items = asyncio.run(run_demo(Path(directory) / "demo.db"))
    for item in items:
        print(describe(item))


if __name__ == "__main__":
    main()
