"""Reference FastAPI service for pytest-fastsched, in the sync tutorial shape.

The same scheduled-job pattern as ``reference_app``, ``pending -> processing -> completed |
error``, with the shape most tutorials teach: an APScheduler 3.x ``BackgroundScheduler`` runs
sync ``def`` jobs on its thread pool, every database access goes through a sync
``SessionLocal = sessionmaker(...)``, and the routes are sync ``def`` functions that get their
session from ``Depends(get_db)``. Each step of a job runs in its own short session, in the
job's own thread, and rows are claimed atomically so that two runs never process the same row.

Modules: :mod:`~reference_app_sync.settings` (environment variables),
:mod:`~reference_app_sync.models` (the ``items`` table), :mod:`~reference_app_sync.database`
(engine, ``SessionLocal``, ``get_db``), :mod:`~reference_app_sync.processing` (the job
bodies), :mod:`~reference_app_sync.scheduler` (the scheduler and its jobs),
:mod:`~reference_app_sync.routers` (HTTP endpoints), :mod:`~reference_app_sync.main` (the
FastAPI app) and :mod:`~reference_app_sync.demo` (a standalone showcase).
"""
