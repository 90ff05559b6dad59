"""Prometheus metrics of pixelmill: definitions, multiprocess setup, HTTP servers, exporter.

Importing this package imports nothing heavy: the exporter (which reads Postgres) and the
servers are imported where they are used.
"""
