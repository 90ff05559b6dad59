"""GPU workers: claim a render job, render its seeds with diffusers, store the PNGs and rows.

Importing this package does nothing: the Celery app is built in :mod:`worker.main`
(``celery -A worker.main worker``), and the model is loaded in each worker process.
"""
