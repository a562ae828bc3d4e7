"""Reference FastAPI service for pytest-fastsched.

It shows the scheduled-job pattern ``pending -> processing -> completed | error`` done right:
an APScheduler 3.x ``AsyncIOScheduler`` runs the jobs, each step of a job runs in its own short
SQLAlchemy 2 async session, and rows are claimed atomically so that two replicas of the service
never process the same row.

Modules: :mod:`~reference_app.settings` (environment variables),
:mod:`~reference_app.models` (the ``items`` table), :mod:`~reference_app.session` (engine,
session factory), :mod:`~reference_app.processing` (the job bodies),
:mod:`~reference_app.scheduler` (the scheduler and its jobs), :mod:`~reference_app.routers`
(HTTP endpoints), :mod:`~reference_app.main` (the FastAPI app) and
:mod:`~reference_app.demo` (a standalone showcase).
"""
