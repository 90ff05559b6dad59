"""Alembic migrations for the pixelmill schema (``pixelmill db upgrade`` runs them)."""
