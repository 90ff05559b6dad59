"""Watching the night's runs: ``pixelmill exporter`` (run progress read from Postgres on every
scrape, exporter.py) and the status report (status.py).

What the workers and the dispatcher count is defined by each of them (worker.metrics,
producer.metrics); how a process serves its metrics is the kernel's (pixelmill.metrics_server,
pixelmill.metrics_multiprocess). Importing this package imports nothing heavy.
"""
