"""The soak suite's conftest: every test must start and end in the baseline state.

The baseline is checked in the set-up and teardown hooks, before any fixture is set up and
after every fixture is torn down (the plugin's fixtures may be set up before autouse ones).
Outcomes are written, one JSON object a line, to ``$SOAK_OUTCOMES`` by the controlling
process (the xdist controller, or the only process).
"""

import asyncio
import datetime
import json
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import app
import asyncpg
import pytest

REAL_DATETIME = datetime.datetime
REAL_TIME = time.time
JOBS = sorted(job.id for job in app.scheduler.get_jobs())
# Threads of the process itself (xdist's execnet), alive before any test ran.
PROCESS_THREADS = set(threading.enumerate())
THREAD_GRACE_SECONDS = 10.0
URLS: set[str] = set()
CONFIG: list[pytest.Config] = []
POOLED_CONNECTION_THREAD = "fastsched-sqlite-connection"


def pytest_configure(config):
    CONFIG.append(config)


def pytest_runtest_logreport(report):
    if hasattr(CONFIG[0], "workerinput"):
        return
    if report.when == "call" or report.outcome != "passed":
        line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome}
        with open(os.environ["SOAK_OUTCOMES"], "a") as outcomes:
            outcomes.write(json.dumps(line) + "\n")


def leftovers(*, rows=True):
    """What an earlier test left behind, as a list of descriptions."""
    found = []
    if datetime.datetime is not REAL_DATETIME or time.time is not REAL_TIME:
        found.append("the wall clock is patched")
    if datetime.datetime.now().year >= 2030 or time.time() >= 1893456000:
        found.append(f"the wall clock reads {datetime.datetime.now()}")
    if app.scheduler.running:
        found.append("the scheduler is running")
    jobs = sorted(job.id for job in app.scheduler.get_jobs())
    if jobs != JOBS:
        found.append(f"the scheduler has the jobs {jobs}")
    threads = stray_threads()
    if threads:
        found.append(f"threads are alive: {threads}")
    for url in sorted(URLS) if rows else ():
        counts = count_rows(url)
        if counts != {"items": 0, "ticks": 0}:
            found.append(f"the test database holds rows: {counts}")
    return found


def stray_threads():
    # A thread that was told to stop may need a moment to end; a leaked one never does.
    deadline = time.monotonic() + THREAD_GRACE_SECONDS
    for thread in threading.enumerate():
        if of_a_test(thread) and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    return sorted(
        thread.name for thread in threading.enumerate() if of_a_test(thread) and thread.is_alive()
    )


def of_a_test(thread):
    """Not the process's own, nor the thread of a pooled connection of the plugin's test
    engine, which serves every test."""
    return thread not in PROCESS_THREADS and thread.name != POOLED_CONNECTION_THREAD


def count_rows(url):
    if url.startswith("sqlite"):
        connection = sqlite3.connect(url.split(":///", 1)[1])
        try:
            return {
                table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("items", "ticks")
            }
        finally:
            connection.close()

    async def count():
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return {
                table: await connection.fetchval(f"SELECT count(*) FROM {table}")
                for table in ("items", "ticks")
            }
        finally:
            await connection.close()

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, count()).result()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    assert leftovers() == []
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    database = item.funcargs.get("fastsched_db")
    result = yield
    if database is not None:
        URLS.add(database.url)
    # The rows are checked when the next test starts (a connection per check costs time).
    assert leftovers(rows=False) == []
    return result


@pytest.fixture(autouse=True)
async def baseline_tasks():
    assert asyncio.all_tasks() == {asyncio.current_task()}
    yield
    assert asyncio.all_tasks() == {asyncio.current_task()}
